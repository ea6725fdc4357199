"""The model families sdrt exports, as data: which text encoders, tokenizers and UNet inputs each one has.

One row per family (research/lora_taiyi_schedulers.md §2.c); everything else (specs, loading, the manifest's
conditioning recipe) is derived from the row, so adding a family is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdrt.runtime.manifest import (SD_PIPELINE_SCHEDULER_FIXES, SDXL_TIME_IDS, TEXT_ENCODER, TEXT_ENCODER_2,
                                   GenerationDefaults)

CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
# The noise schedule every SD 1.x/2.x/SDXL/Taiyi scheduler config ships with.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# The scheduler configs the reference repositories ship (single files carry none): (diffusers class, config).
PNDM_SD = ("PNDMScheduler",  # stable-diffusion-v1-5, SD 2.x base, Taiyi
           dict(**SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon"))
DDIM_SD2 = ("DDIMScheduler",  # stable-diffusion-2-1 (768, v-prediction)
            dict(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="v_prediction"))
EULER_SDXL = ("EulerDiscreteScheduler",  # stable-diffusion-xl-base-1.0
              dict(**SD_BETAS, interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
                   timestep_spacing="leading", use_karras_sigmas=False))
BERT_TOKENIZERS = ("BertTokenizer", "BertTokenizerFast")


@dataclass(frozen=True)
class TextEncoderRole:
    """One text encoder of a family and how the pipeline uses its outputs."""

    component: str  # the checkpoint folder and the engine dir component: "text_encoder", "text_encoder_2"
    tokenizer: str  # the checkpoint's tokenizer folder
    classes: tuple[str, ...]  # transformers model classes accepted (model_index.json names the one used)
    tokenizer_classes: tuple[str, ...]
    # SDXL conditions on the penultimate hidden state (hidden_states[-2], before the final layer norm);
    # the SD 1.x/2.x and Taiyi pipelines on the last one (output[0]).
    penultimate: bool = False
    pooled: bool = False  # also emits `text_embeds` (CLIPTextModelWithProjection's projected pooled output)

    @property
    def output(self) -> str:
        return "penultimate_hidden_state" if self.penultimate else "last_hidden_state"


@dataclass(frozen=True)
class ExportFamily:
    name: str
    pipeline: str  # the diffusers pipeline whose images sdrt reproduces (the parity oracle)
    text_encoders: tuple[TextEncoderRole, ...]
    time_ids: tuple[str, ...] = ()  # the UNet's added time_ids input, by value name
    # The pipeline honours model_index.json's force_zeros_for_empty_prompt (default: this value).
    force_zeros_default: bool | None = None
    # Scheduler config rewrites the pipeline makes at construction; written into scheduler.json.
    scheduler_fixes: dict = field(default_factory=dict)
    # Recommended settings where the checkpoint and the command line say none: the pipeline's own defaults
    # where they differ from sdrt's built-in ones.
    defaults: GenerationDefaults = GenerationDefaults()

    @property
    def components(self) -> tuple[str, ...]:
        from sdrt.runtime.manifest import UNET, VAE_DECODER, VAE_ENCODER

        return (*(r.component for r in self.text_encoders), UNET, VAE_DECODER, VAE_ENCODER)

    def force_zeros(self, model_index: dict) -> bool:
        if self.force_zeros_default is None:
            return False
        return bool(model_index.get("force_zeros_for_empty_prompt", self.force_zeros_default))


CLIP_LAST = TextEncoderRole(TEXT_ENCODER, "tokenizer", ("CLIPTextModel",), CLIP_TOKENIZERS)
FAMILIES = {
    "sd1": ExportFamily("sd1", "StableDiffusionPipeline", (CLIP_LAST,),
                        scheduler_fixes=SD_PIPELINE_SCHEDULER_FIXES),
    # OpenCLIP-H as diffusers stores it: a CLIPTextModel with 23 layers (the last resblock dropped), gelu.
    "sd2": ExportFamily("sd2", "StableDiffusionPipeline", (CLIP_LAST,), scheduler_fixes=SD_PIPELINE_SCHEDULER_FIXES),
    # Taiyi: a Chinese BERT replaces CLIP; the pipeline is StableDiffusionPipeline, no attention mask, 512 tokens.
    "taiyi": ExportFamily("taiyi", "StableDiffusionPipeline",
                          (TextEncoderRole(TEXT_ENCODER, "tokenizer", ("BertModel",), BERT_TOKENIZERS),),
                          scheduler_fixes=SD_PIPELINE_SCHEDULER_FIXES),
    "sdxl": ExportFamily(
        "sdxl", "StableDiffusionXLPipeline",
        (TextEncoderRole(TEXT_ENCODER, "tokenizer", ("CLIPTextModel",), CLIP_TOKENIZERS, penultimate=True),
         TextEncoderRole(TEXT_ENCODER_2, "tokenizer_2", ("CLIPTextModelWithProjection",), CLIP_TOKENIZERS,
                         penultimate=True, pooled=True)),
        time_ids=SDXL_TIME_IDS,
        force_zeros_default=True,
        defaults=GenerationDefaults(guidance_scale=5.0),  # StableDiffusionXLPipeline's default guidance
        # StableDiffusionXLPipeline does not rewrite its scheduler's config (unlike StableDiffusionPipeline).
    ),
}
