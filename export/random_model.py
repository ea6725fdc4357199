"""Random-weight Stable Diffusion checkpoints with the real diffusers/transformers architectures.

No weights can be downloaded here, so tests build the `tiny*` models in seconds and benchmarks build the
full-size architectures (`sd15`, `sd21-768`, `sdxl`, `taiyi`) to measure memory and speed. All are written as
ordinary diffusers folders (safetensors) that diffusers' own pipelines load with `from_pretrained`, exactly what
`sdrt export --checkpoint` reads. A family is data (`RandomModelConfig`) plus the small builders below.

Components are built and saved one at a time, so a full-size SDXL UNet (10.3 GB in fp32) never shares memory
with the rest; model_index.json comes from the pipeline class itself, built around weightless (meta) modules.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdrt.export.families import DDIM_SD2, EULER_SDXL, PNDM_SD
from sdrt.export.random_tokenizers import BOS, EOS, OPENCLIP_PAD, bytes_to_unicode, write_bert_tokenizer
from sdrt.export.random_tokenizers import write_clip_tokenizer

__all__ = ["BOS", "EOS", "CONFIGS", "RandomModelConfig", "bytes_to_unicode", "write_random_checkpoint"]


@dataclass(frozen=True)
class UNetSize:
    channels: tuple[int, ...]
    layers_per_block: int
    head_dim: int | tuple[int, ...]  # diffusers' `attention_head_dim`; SD 2.x/SDXL store heads per block here
    sample_size: int  # latent side at the native resolution
    cross_attention: tuple[bool, ...]  # per down block; up blocks mirror it
    transformer_layers: int | tuple[int, ...] = 1
    linear_projection: bool = False  # SD 2.x/SDXL: proj_in/proj_out are Linear, not 1x1 Conv
    upcast_attention: bool = False  # SD 2.1: attention scores in fp32
    time_embed_dim: int = 0  # SDXL `addition_time_embed_dim`; 0: no text_time conditioning


@dataclass(frozen=True)
class VaeSize:
    channels: tuple[int, ...]
    layers_per_block: int
    scaling_factor: float = 0.18215
    force_upcast: bool = True  # diffusers' default; SDXL's VAE overflows in fp16


@dataclass(frozen=True)
class TextSize:
    model: str  # transformers class: a key of TEXT_ENCODERS
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 0  # 0: the size of the generated tokenizer vocabulary; else the real (larger) table size
    act: str = "quick_gelu"
    projection_dim: int = 0  # 0: = hidden
    pad: str = EOS  # CLIP pad token; OpenCLIP's encoders pad with "!"
    max_positions: int = 77
    # "generated": a small BPE vocabulary of its own; "clip": the real CLIP vocabulary that ships with sdrt
    # (what a single-file export uses, so that a folder and its single file tokenize alike).
    bpe: str = "generated"


@dataclass(frozen=True)
class RandomModelConfig:
    """Architecture of one random checkpoint: sizes, its diffusers pipeline and scheduler."""

    unet: UNetSize
    vae: VaeSize
    text: tuple[TextSize, ...]  # text_encoder, text_encoder_2, ... in pipeline order
    scheduler: str  # key of SCHEDULERS
    pipeline: str = "sd"  # key of PIPELINES
    norm_groups: int = 32


SD1_UNET = UNetSize((320, 640, 1280, 1280), 2, 8, 64, (True, True, True, False))
SD_VAE = VaeSize((128, 256, 512, 512), 2)
TINY_UNET = UNetSize((32, 64), 1, 8, 8, (True, False))
TINY_VAE = VaeSize((32, 32, 32, 32), 1)  # four blocks: the SD latent factor 8
TINY_CLIP = TextSize("CLIPTextModel", 32, 2, 4, 37)
TINY_SD2_UNET = UNetSize((32, 64), 1, (2, 4), 8, (True, False), linear_projection=True, upcast_attention=True)
TINY_SD2_CLIP = TextSize("CLIPTextModel", 32, 2, 4, 37, act="gelu", pad=OPENCLIP_PAD)

# Tiny models that keep the original families' constants (SD 1.x's 8 heads, 64-wide SD 2.x/SDXL and OpenCLIP
# heads, CLIP-L's 12 heads, GroupNorm 32) and CLIP's real vocabulary: they can be written as single files and
# read back from their shapes alone (export/ldm_config.py).
LDM_UNET = UNetSize((32, 64), 1, 8, 8, (True, False))
LDM_CLIP_L = TextSize("CLIPTextModel", 48, 2, 12, 64, vocab=49408, bpe="clip")
LDM_OPEN_CLIP = TextSize("CLIPTextModel", 64, 3, 1, 96, vocab=49408, act="gelu", pad=OPENCLIP_PAD, bpe="clip")

CONFIGS = {
    # Real block types and cross-attention; 64 px native, 8x8 latents, VAE factor 8 like SD 1.x.
    "tiny": RandomModelConfig(TINY_UNET, TINY_VAE, (TINY_CLIP,), "pndm"),
    # stable-diffusion-v1-5 configs (unet/vae/text_encoder config.json).
    "sd15": RandomModelConfig(SD1_UNET, SD_VAE, (TextSize("CLIPTextModel", 768, 12, 12, 3072, vocab=49408),), "pndm"),
    # SD 2.x base (512): linear projections, heads per block, OpenCLIP-style text encoder (gelu, pad "!").
    "tiny-sd2": RandomModelConfig(TINY_SD2_UNET, TINY_VAE, (TINY_SD2_CLIP,), "pndm"),
    # SD 2.1 (768, v-prediction): the same at a larger native size, 96 px vs 64 px.
    "tiny-sd2-v": RandomModelConfig(replace(TINY_SD2_UNET, sample_size=12), TINY_VAE, (TINY_SD2_CLIP,), "ddim-v"),
    # stabilityai/stable-diffusion-2-1: OpenCLIP ViT-H text tower converted without its last block (23 layers).
    "sd21-768": RandomModelConfig(
        UNetSize((320, 640, 1280, 1280), 2, (5, 10, 20, 20), 96, (True, True, True, False),
                 linear_projection=True, upcast_attention=True),
        SD_VAE,
        (TextSize("CLIPTextModel", 1024, 23, 16, 4096, vocab=49408, act="gelu", projection_dim=512,
                  pad=OPENCLIP_PAD),),
        "ddim-v"),
    # diffusers' tiny SDXL test UNet; the encoders differ in width (32 vs 48, projection 40) so concat-order
    # and pooled-vs-hidden mix-ups change shapes instead of passing silently.
    "tiny-sdxl": RandomModelConfig(
        UNetSize((32, 64), 2, (2, 4), 8, (False, True), transformer_layers=(1, 2), linear_projection=True,
                 time_embed_dim=8),
        VaeSize((32, 32, 32, 32), 1, scaling_factor=0.13025),
        (TINY_CLIP, TextSize("CLIPTextModelWithProjection", 48, 2, 4, 37, act="gelu", projection_dim=40,
                             pad=OPENCLIP_PAD)),
        "euler-leading", pipeline="sdxl"),
    # stabilityai/stable-diffusion-xl-base-1.0: CLIP-L + OpenCLIP bigG, cross 768 + 1280 = 2048.
    "sdxl": RandomModelConfig(
        UNetSize((320, 640, 1280), 2, (5, 10, 20), 128, (False, True, True), transformer_layers=(1, 2, 10),
                 linear_projection=True, time_embed_dim=256),
        VaeSize((128, 256, 512, 512), 2, scaling_factor=0.13025),
        (TextSize("CLIPTextModel", 768, 12, 12, 3072, vocab=49408),
         TextSize("CLIPTextModelWithProjection", 1280, 32, 20, 5120, vocab=49408, act="gelu", projection_dim=1280,
                  pad=OPENCLIP_PAD)),
        "euler-leading", pipeline="sdxl"),
    # IDEA-CCNL Taiyi: the SD 1.x UNet/VAE conditioned on a Chinese BERT (512 tokens, no attention mask).
    "tiny-taiyi": RandomModelConfig(TINY_UNET, TINY_VAE, (TextSize("BertModel", 32, 2, 4, 37, max_positions=512),),
                                    "pndm"),
    "taiyi": RandomModelConfig(
        SD1_UNET, SD_VAE, (TextSize("BertModel", 768, 12, 12, 3072, vocab=21128, max_positions=512),), "pndm"),
    "ldm-sd1": RandomModelConfig(LDM_UNET, TINY_VAE, (LDM_CLIP_L,), "pndm"),
    "ldm-sd2-v": RandomModelConfig(
        UNetSize((64, 128), 1, (1, 2), 8, (True, False), linear_projection=True, upcast_attention=True),
        TINY_VAE, (LDM_OPEN_CLIP,), "ddim-v"),
    "ldm-sdxl": RandomModelConfig(
        UNetSize((64, 128), 2, (1, 2), 8, (False, True), transformer_layers=(1, 2), linear_projection=True,
                 time_embed_dim=8),
        VaeSize((32, 32, 32, 32), 1, scaling_factor=0.13025),
        (LDM_CLIP_L, replace(LDM_OPEN_CLIP, model="CLIPTextModelWithProjection", projection_dim=40)),
        "euler-leading", pipeline="sdxl"),
    "ldm-taiyi": RandomModelConfig(LDM_UNET, TINY_VAE, (TextSize("BertModel", 48, 2, 12, 64, max_positions=512),),
                                   "pndm"),
}


# name -> (diffusers scheduler class, its config): the ones the reference repositories ship.
SCHEDULERS = {"pndm": PNDM_SD, "ddim-v": DDIM_SD2, "euler-leading": EULER_SDXL}


def build_unet(cfg: RandomModelConfig):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    # SDXL's added conditioning: 6 micro-conditioning ids (sizes, crop), each Fourier-embedded to
    # time_embed_dim, concatenated with the last encoder's pooled projection.
    text_time = dict(addition_embed_type="text_time", addition_time_embed_dim=u.time_embed_dim,
                     projection_class_embeddings_input_dim=6 * u.time_embed_dim + _projection_dim(cfg.text[-1]))
    return UNet2DConditionModel(
        sample_size=u.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=u.channels,
        layers_per_block=u.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention)),
        cross_attention_dim=sum(t.hidden for t in cfg.text),  # SDXL concatenates both encoders' states
        attention_head_dim=u.head_dim,
        transformer_layers_per_block=u.transformer_layers,
        use_linear_projection=u.linear_projection,
        upcast_attention=u.upcast_attention,
        norm_num_groups=cfg.norm_groups,
        **(text_time if u.time_embed_dim else {}),
    )


def build_vae(cfg: RandomModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae.channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae.channels,
        layers_per_block=cfg.vae.layers_per_block,
        latent_channels=4,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.unet.sample_size * 2 ** (n - 1),
        scaling_factor=cfg.vae.scaling_factor,
        force_upcast=cfg.vae.force_upcast,
    )


def _projection_dim(t: TextSize) -> int:
    return t.projection_dim or t.hidden


def _clip_text_model(t: TextSize, tokenizer):
    import transformers

    vocab = max(t.vocab, len(tokenizer))
    return getattr(transformers, t.model)(
        transformers.CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=t.hidden,
            intermediate_size=t.intermediate,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.max_positions,
            hidden_act=t.act,
            projection_dim=_projection_dim(t),
            # The tokenizer's ids even when the table is the real, larger size: CLIP pools the hidden state at
            # the eos position, so an id the tokenizer never emits would pool the BOS token for every prompt.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _bert_model(t: TextSize, tokenizer):
    from transformers import BertConfig, BertModel

    # Taiyi's text_encoder/config.json values beyond the sizes.
    return BertModel(
        BertConfig(
            vocab_size=max(t.vocab, len(tokenizer)),
            hidden_size=t.hidden,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            intermediate_size=t.intermediate,
            hidden_act="gelu",
            max_position_embeddings=t.max_positions,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
            layer_norm_eps=1e-12,
        )
    )


def _clip_tokenizer(folder: Path, t: TextSize) -> None:
    if t.bpe == "clip":
        from transformers import CLIPTokenizer

        from sdrt.export.single_file import shipped_clip_vocabulary

        CLIPTokenizer.from_pretrained(shipped_clip_vocabulary(), pad_token=t.pad).save_pretrained(folder)
    else:
        write_clip_tokenizer(folder, pad=t.pad)


def _bert_tokenizer(folder: Path, t: TextSize) -> None:
    write_bert_tokenizer(folder, model_max_length=t.max_positions)  # Taiyi pads prompts to all 512 positions


# transformers text-encoder class -> (model builder, tokenizer writer, transformers tokenizer class)
TEXT_ENCODERS = {
    "CLIPTextModel": (_clip_text_model, _clip_tokenizer, "CLIPTokenizer"),
    "CLIPTextModelWithProjection": (_clip_text_model, _clip_tokenizer, "CLIPTokenizer"),
    "BertModel": (_bert_model, _bert_tokenizer, "BertTokenizer"),
}


def _sd_pipeline(parts: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **parts)


def _sdxl_pipeline(parts: dict):
    from diffusers import StableDiffusionXLPipeline

    # add_watermarker=False: the watermark package is optional and not part of model_index.json.
    return StableDiffusionXLPipeline(force_zeros_for_empty_prompt=True, add_watermarker=False, **parts)


PIPELINES = {"sd": _sd_pipeline, "sdxl": _sdxl_pipeline}


def _component_names(cfg: RandomModelConfig) -> list[tuple[str, str]]:
    """(text_encoder, tokenizer) folder names in pipeline order: text_encoder, text_encoder_2, ..."""
    suffixes = [""] + [f"_{i}" for i in range(2, len(cfg.text) + 1)]
    return [(f"text_encoder{s}", f"tokenizer{s}") for s in suffixes]


def module_builders(cfg: RandomModelConfig, tokenizers: dict) -> dict:
    """Builders of the weighted modules, in the order that fixes which random numbers each gets."""
    builders = {"unet": lambda: build_unet(cfg), "vae": lambda: build_vae(cfg)}
    for t, (enc, tok) in zip(cfg.text, _component_names(cfg)):
        builders[enc] = lambda t=t, tok=tok: TEXT_ENCODERS[t.model][0](t, tokenizers[tok])
    return builders


def write_random_checkpoint(folder: Path, name: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers-format folder of random model `name` (a CONFIGS key); returns `folder`."""
    import diffusers
    import transformers

    cfg = CONFIGS[name]
    folder = Path(folder)
    tokenizers = {}
    for t, (_, tok) in zip(cfg.text, _component_names(cfg)):
        _, write_tokenizer, tokenizer_cls = TEXT_ENCODERS[t.model]
        write_tokenizer(folder / tok, t)
        tokenizers[tok] = getattr(transformers, tokenizer_cls).from_pretrained(folder / tok)
    builders = module_builders(cfg, tokenizers)
    torch.manual_seed(seed)
    for component, build in builders.items():
        module = build().eval()
        # The arguments DiffusionPipeline.save_pretrained passes: transformers 5 always writes safetensors (it
        # has no safe_serialization) and wants save_peft_format=False.
        is_transformers = isinstance(module, transformers.PreTrainedModel)
        module.save_pretrained(folder / component,
                               **({"save_peft_format": False} if is_transformers else {"safe_serialization": True}))
        del module
        gc.collect()  # the next full-size component must not share RAM with this one
    scheduler_cls, scheduler_config = SCHEDULERS[cfg.scheduler]
    scheduler = getattr(diffusers, scheduler_cls)(**scheduler_config)
    scheduler.save_pretrained(folder / "scheduler")
    with torch.device("meta"):  # weightless stand-ins: only their classes reach model_index.json
        modules = {component: build() for component, build in builders.items()}
    PIPELINES[cfg.pipeline](dict(modules, scheduler=scheduler, **tokenizers)).save_config(folder)
    return folder


def write_random_single_file(path: Path, name: str = "ldm-sd1", seed: int = 0) -> Path:
    """Write random model `name` as one .safetensors file in the original (LDM / A1111) layout; returns `path`.

    The diffusers folder is written first (to a temporary sibling) and converted with export/single_file.py's
    inverse name maps, so the file holds exactly the folder's weights.
    """
    import tempfile

    from safetensors.torch import save_file

    from sdrt.export.checkpoint import load_modules, open_checkpoint
    from sdrt.export.single_file import to_single_file

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        ckpt = open_checkpoint(write_random_checkpoint(Path(tmp) / "ckpt", name, seed))
        modules = load_modules(ckpt)
        tensors = to_single_file(modules, ckpt.family)
        del modules
        save_file(tensors, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m sdrt.export.random_model",
        description="Write a random-weight Stable Diffusion diffusers checkpoint (real architecture, no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", type=Path, help="folder to create (with --single-file: the .safetensors file)")
    p.add_argument("--model", choices=sorted(CONFIGS), default="tiny", help="architecture family and size")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    p.add_argument("--single-file", action="store_true",
                   help="write one .safetensors file in the original LDM/A1111 layout instead of a diffusers folder "
                   "(the ldm-* models keep the families' constants, so sdrt reads them back from their shapes)")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} already exists")
    if args.single_file:
        write_random_single_file(args.out, args.model, args.seed)
    else:
        write_random_checkpoint(args.out, args.model, args.seed)
    print(f"wrote {args.model} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
