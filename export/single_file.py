"""Single-file checkpoints (the original LDM / A1111 layout): detect, configure and load them offline.

The family comes from the keys and shapes (research/lora_taiyi_schedulers.md §2.d), every size from the shapes
(export/ldm_config.py), every tensor through the name maps (export/ldm_keys.py). Nothing is fetched: the CLIP
BPE vocabulary ships with sdrt (the embedded demo model's tokenizer folder), the scheduler is the family's
reference config. What cannot be told from the weights (v-prediction, native size) has a family default that
`--prediction-type` / `--native-size` override, and the manifest records which was used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import SUPPORTED_FAMILIES, TEXT_ENCODER, TEXT_ENCODER_2

from . import ldm_keys as K
from .families import DDIM_SD2, EULER_SDXL, PNDM_SD
from .ldm_config import Constants, bert_config, clip_config, open_clip_config, unet_config, vae_config
from .tensor_file import TensorFile

MIN_EMA_KEYS = 100  # diffusers' rule: a file carries an EMA copy of the UNet when it has this many model_ema.*
BERT_EMBEDDINGS = "embeddings.word_embeddings.weight"
OPENCLIP_PAD = "!"  # OpenCLIP's tokenizer (SD 2.x, SDXL's second) pads with "!", id 0
# diffusers' legacy rule: the SD 2.x 512-base release was saved at this step; every other 2.x file is 768-v.
SD2_BASE_GLOBAL_STEP = 875000
MODELSPEC = "modelspec."  # Stability AI Model Spec keys in a safetensors header (github.com/Stability-AI/ModelSpec)


@dataclass(frozen=True)
class Encoder:
    """One text encoder of a single file: where its weights are and how they map onto transformers' class."""

    component: str
    model_class: str  # CLIPTextModel, CLIPTextModelWithProjection or BertModel
    layout: str  # "clip" (transformers' names), "open_clip" or "bert"
    prefix: str  # file prefix of the weights
    nested: bool = True  # CLIP: the file has transformers' `text_model.` level (all but the oldest files)
    pad: str | None = None  # the tokenizer's pad token (CLIP families)
    drop_last_layer: bool = False  # SD 2.x: diffusers' CLIPTextModel has the OpenCLIP tower minus its last block

    def config(self, shapes: dict) -> dict:
        if self.layout == "bert":
            return bert_config(shapes, self.prefix)
        if self.layout == "open_clip":
            return open_clip_config(shapes, self.prefix, self.drop_last_layer)
        return clip_config(shapes, self.prefix + ("text_model." if self.nested else ""))

    def slots(self) -> K.SlotMap:
        if self.layout == "open_clip":
            return K.open_clip_slots(self.prefix)
        if self.layout == "clip":
            return K.clip_slots(self.prefix, self.nested)
        return K.hf_slots(self.prefix)


@dataclass(frozen=True)
class LdmFamily:
    """What a family's single files do not say: head constants, reference scheduler, native size, VAE scale."""

    constants: Constants
    scheduler: tuple[str, dict]
    native_size: int
    vae_scaling: float = 0.18215  # LDM_VAE_DEFAULT_SCALING_FACTOR
    native_size_v: int | None = None  # the native size of v-prediction files, where it differs


LDM_FAMILIES = {
    "sd1": LdmFamily(Constants(unet_heads=8), PNDM_SD, 512),
    "taiyi": LdmFamily(Constants(unet_heads=8), PNDM_SD, 512),
    # 2.1 attends in fp32 (upcast_attention); 512-base is epsilon, 768 v-prediction.
    "sd2": LdmFamily(Constants(unet_heads=None, upcast_attention=True), DDIM_SD2, 512, native_size_v=768),
    "sdxl": LdmFamily(Constants(unet_heads=None), EULER_SDXL, 1024, vae_scaling=0.13025),
}


# Each family's text encoders as the original trainers save them (what `to_single_file` writes).
ENCODERS = {
    "sd1": (Encoder(TEXT_ENCODER, "CLIPTextModel", "clip", K.SD1_CLIP_PREFIX),),
    # Fengshenbang's converter saves Taiyi's BertModel state dict under the SD 1.x CLIP prefix.
    "taiyi": (Encoder(TEXT_ENCODER, "BertModel", "bert", K.SD1_CLIP_PREFIX),),
    "sd2": (Encoder(TEXT_ENCODER, "CLIPTextModel", "open_clip", K.SD2_OPEN_CLIP_PREFIX, pad=OPENCLIP_PAD,
                    drop_last_layer=True),),
    "sdxl": (Encoder(TEXT_ENCODER, "CLIPTextModel", "clip", K.SDXL_CLIP_PREFIX),
             Encoder(TEXT_ENCODER_2, "CLIPTextModelWithProjection", "open_clip", K.SDXL_OPEN_CLIP_PREFIX,
                     pad=OPENCLIP_PAD)),
}


def _with_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _located(enc: Encoder, keys) -> Encoder:
    """The family's encoder as this file stores it: CLIP with or without `text_model.`, BERT under any prefix."""
    if enc.layout == "clip" and f"{enc.prefix}text_model.embeddings.token_embedding.weight" not in keys:
        return replace(enc, nested=False)
    if enc.layout == "bert":
        found = next(k for k in keys if k.startswith("cond_stage_model.") and k.endswith(BERT_EMBEDDINGS))
        return replace(enc, prefix=found.removesuffix(BERT_EMBEDDINGS))
    return enc


def refuse_non_checkpoint(tf: TensorFile) -> None:
    """Files that are something else than an SD checkpoint: one line naming what they are."""
    keys, name = tf.shapes, tf.path.name
    if any(re.search(r"lora_(down|up|A|B)\b|^lora_|\.hada_w1_a$|\.lokr_w1$", k) for k in keys):
        raise UserError(f"{name} is a LoRA file ({len(keys)} tensors), not a checkpoint: pass it with --lora")
    if any(k.startswith("control_model.") or "input_hint_block" in k for k in keys):
        raise UserError(f"{name} is a ControlNet, not a Stable Diffusion checkpoint")
    if any(".joint_blocks." in k or "double_blocks." in k or k.endswith("x_embedder.proj.weight") for k in keys):
        raise UserError(f"{name} is a diffusion transformer (SD3 / Flux); sdrt exports SD 1.x, 2.x, SDXL, Taiyi")
    if "edm_mean" in keys:
        raise UserError(f"{name} is a Playground (EDM) checkpoint; sdrt exports SD 1.x, 2.x, SDXL, Taiyi")
    if not _with_prefix(keys, K.UNET_PREFIX):
        if _with_prefix(keys, K.EMA_PREFIX):
            raise UserError(f"{name} has model_ema.* tensors but no UNet sdrt can read: neither "
                            f"{K.UNET_PREFIX}* weights nor an EMA copy of a Stable Diffusion UNet")
        text = any(k.startswith(("cond_stage_model.", "conditioner.")) for k in keys)
        if not text and any(k.endswith("decoder.conv_out.weight") for k in keys):
            raise UserError(f"{name} is a VAE file, not a checkpoint: pass it with --vae")
        raise UserError(f"{name} has no Stable Diffusion UNet ({K.UNET_PREFIX}*) among its {len(keys)} tensors")


def detect(tf: TensorFile) -> tuple[str, tuple[Encoder, ...]]:
    """(family, its text encoders) from the keys, in diffusers' order; unsupported variants named and refused."""
    refuse_non_checkpoint(tf)
    keys, name = tf.shapes, tf.path.name
    if _with_prefix(keys, K.SDXL_OPEN_CLIP_PREFIX) and _with_prefix(keys, K.SDXL_CLIP_PREFIX):
        family = "sdxl"
    elif _with_prefix(keys, "conditioner.embedders.0.model."):
        family = "sdxl-refiner"  # the refiner has only the bigG encoder
    elif any(k.startswith("cond_stage_model.") and k.endswith(BERT_EMBEDDINGS) for k in keys):
        family = "taiyi"
    elif _with_prefix(keys, K.SD2_OPEN_CLIP_PREFIX):
        family = "sd2"
    elif _with_prefix(keys, K.SD1_CLIP_PREFIX):
        family = "sd1"
    else:
        raise UserError(f"{name} has a UNet but no text encoder (cond_stage_model.* / conditioner.embedders.*): "
                        "a UNet-only file cannot be exported")
    in_channels = keys[f"{K.UNET_PREFIX}input_blocks.0.0.weight"][1]
    if in_channels == 9:
        family = "sdxl-inpaint" if family == "sdxl" else "sd-inpaint"
    elif in_channels != 4:
        family = f"{family} with a {in_channels}-channel UNet"
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"{name}: unsupported model family '{family}' "
                        f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    return family, tuple(_located(e, keys) for e in ENCODERS[family])


def vae_prefix(keys) -> str | None:
    """The prefix of the baked-in VAE (first_stage_model. or vae.), or None if the file has none."""
    return next((p for p in K.VAE_PREFIXES if f"{p}decoder.conv_out.weight" in keys), None)


def restore_ema_only(tf: TensorFile) -> bool:
    """A file whose UNet exists only as its EMA copy: make those tensors readable under the UNet's own keys."""
    if any(k.startswith(K.UNET_PREFIX) for k in tf.shapes):
        return False
    names = {k: K.unet_key_of_ema(k) for k in tf.shapes if k.startswith(K.EMA_PREFIX)}
    unet = {ldm: ema for ema, ldm in names.items() if ldm is not None}
    if len(unet) <= MIN_EMA_KEYS:
        return False
    tf.alias(unet)
    return True


def unet_getter(tf: TensorFile, use_ema: bool):
    """How to read a UNet key: the EMA copy (LitEma's `model_ema.` key) when chosen and present, or the only copy."""
    if tf.aliases:
        return tf.get, True  # an EMA-only file: its UNet keys are already the EMA copy's
    ema_keys = sum(k.startswith(K.EMA_PREFIX) for k in tf.shapes)
    if not use_ema or ema_keys <= MIN_EMA_KEYS:
        return tf.get, False
    unet = [k for k in tf.shapes if k.startswith(K.UNET_PREFIX)]
    if not all(K.ema_key(k) in tf.shapes for k in unet):
        return tf.get, False
    return (lambda key: tf.get(K.ema_key(key)) if key.startswith(K.UNET_PREFIX) else tf.get(key)), True


def modelspec(tf: TensorFile) -> tuple[str | None, int | None]:
    """(prediction type, native size) from the file's Stability AI Model Spec metadata, where it says them.

    `modelspec.prediction_type` is "v" or "epsilon", `modelspec.resolution` "WxH"; kohya's sd-scripts and
    Stability's own releases write them into the safetensors header.
    """
    meta = tf.metadata
    prediction = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon"}.get(
        str(meta.get(MODELSPEC + "prediction_type", "")).strip().lower())
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(meta.get(MODELSPEC + "resolution", "")))
    size = int(m[1]) if m and m[1] == m[2] else None  # the engine dir's native resolution is square
    return prediction, size


def prediction_type(family: str, tf: TensorFile, override: str | None) -> tuple[str, str]:
    """(prediction type, where it came from)."""
    if override:
        return override, "--prediction-type"
    if declared := modelspec(tf)[0]:
        return declared, "the file's modelspec metadata"
    if family == "sd2":
        if tf.global_step == SD2_BASE_GLOBAL_STEP:
            return "epsilon", f"global_step {SD2_BASE_GLOBAL_STEP} (the SD 2.x 512-base release)"
        return "v_prediction", "the SD 2.x default (768-v)"
    return "epsilon", f"the {family} default"


def native_size(family: str, tf: TensorFile, prediction: str, override: int | None) -> tuple[int, str]:
    """(native size in pixels, where it came from)."""
    if override:
        return override, "--native-size"
    if declared := modelspec(tf)[1]:
        return declared, "the file's modelspec metadata"
    lf = LDM_FAMILIES[family]
    if prediction == "v_prediction" and lf.native_size_v:
        return lf.native_size_v, f"the {family} default for v-prediction"
    return lf.native_size, f"the {family} default"


def build(make, slots: K.SlotMap, get, source: str) -> torch.nn.Module:
    """The module `make()` builds, without allocating random weights, its tensors read through `slots`.

    `source` names the file in errors (a shape that disagrees with the configuration read from the others).
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = make()
    names = list(module.state_dict())
    try:
        state = K.read_state_dict(names, slots, get)
    except K.UnmappedName as e:
        raise UserError(f"unsupported layout: no single-file name for {type(module).__name__} weight {e}") from None
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"cannot load {source}: {str(e).strip().splitlines()[-1].strip()}") from None
    return module.eval().requires_grad_(False)


@dataclass(frozen=True)
class SingleFile:
    """An opened single file and everything read from it that loading needs."""

    file: TensorFile
    encoders: tuple[Encoder, ...]
    encoder_configs: tuple[dict, ...]
    unet_config: dict
    vae_config: dict | None  # None: the file has no VAE and --vae supplies it
    vae_prefix: str | None
    ema: bool  # the UNet is read from the file's EMA copy
    scheduler: tuple[str, dict]
    detected: dict  # for the manifest: what was read from the file or assumed for its family


def open_single_file(path: Path, opts) -> tuple[str, SingleFile]:
    """(family, plan) of a single-file checkpoint: checked and configured from its header alone.

    `opts` is the exporter's SourceOptions (the overrides: prediction type, native size, EMA, --vae).
    """
    tf = TensorFile(path)
    restore_ema_only(tf)
    family, encoders = detect(tf)
    shapes, lf = tf.shapes, LDM_FAMILIES[family]
    prediction, prediction_from = prediction_type(family, tf, opts.prediction_type)
    native, native_from = native_size(family, tf, prediction, opts.native_size)
    configs = tuple(e.config(shapes) for e in encoders)
    pooled = configs[-1]["projection_dim"] if encoders[-1].model_class.endswith("WithProjection") else None
    prefix = vae_prefix(shapes)
    if prefix is None and not opts.vae:
        raise UserError(f"{path.name} has no VAE ({' / '.join(p + '*' for p in K.VAE_PREFIXES)}): pass --vae FILE")
    vae = vae_config(shapes, prefix, native, lf.vae_scaling) if prefix else None
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
    unet = unet_config(shapes, K.UNET_PREFIX, lf.constants, native // factor, pooled)
    _, ema = unet_getter(tf, opts.ema)
    scheduler_cls, scheduler_config = lf.scheduler
    detected = dict(
        family=family, tensors=len(shapes), dtypes=tf.dtypes, ema=ema,
        prediction_type=prediction, prediction_type_from=prediction_from,
        native_size=native, native_size_from=native_from,
        vae="--vae" if opts.vae else "baked in",
    )
    return family, SingleFile(tf, encoders, configs, unet, vae, prefix, ema,
                              (scheduler_cls, {**scheduler_config, "prediction_type": prediction}), detected)


def shipped_clip_vocabulary() -> Path:
    """The CLIP BPE vocabulary (vocab.json + merges.txt) that ships with sdrt, in the demo model's folder."""
    from .checkpoint import DEMO_DIR

    if DEMO_DIR is None or not (DEMO_DIR / "tokenizer" / "vocab.json").is_file():
        raise UserError("sdrt's CLIP vocabulary is missing from this install (sdrt.demo/tokenizer): "
                        "pass --tokenizer DIR")
    return DEMO_DIR / "tokenizer"


def load_tokenizer(enc: Encoder, config: dict, folder: Path | None):
    """The encoder's tokenizer: sdrt's CLIP vocabulary (with the family's pad token) or `folder` (--tokenizer)."""
    import transformers

    if enc.layout == "bert":
        if folder is None:
            raise UserError("a Taiyi single file carries no vocabulary: pass --tokenizer DIR (its tokenizer folder, "
                            "with vocab.txt)")
        tok = transformers.BertTokenizer.from_pretrained(folder)
    else:
        pad = {"pad_token": enc.pad} if enc.pad else {}
        tok = transformers.CLIPTokenizer.from_pretrained(folder or shipped_clip_vocabulary(), **pad)
    tok.model_max_length = min(int(tok.model_max_length), int(config["max_position_embeddings"]))
    if len(tok) > config["vocab_size"]:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the {enc.component} has {config['vocab_size']}: "
                        "pass --tokenizer DIR with the checkpoint's own vocabulary")
    return tok


def load_single_file(sf: SingleFile, tokenizer_folder: Path | None, tokenizer_names: dict[str, str]) -> dict:
    """The torch modules (fp32, eval) and tokenizer/scheduler objects, keyed as load_modules keys them."""
    import diffusers
    import transformers

    tf, modules, source = sf.file, {}, sf.file.path.name
    try:
        for enc, cfg in zip(sf.encoders, sf.encoder_configs):
            cls = getattr(transformers, enc.model_class)
            if enc.layout == "bert":
                pooler = f"{enc.prefix}pooler.dense.weight" in tf
                make = lambda cls=cls, cfg=cfg, p=pooler: cls(transformers.BertConfig(**cfg), add_pooling_layer=p)
            else:
                make = lambda cls=cls, cfg=cfg: cls(transformers.CLIPTextConfig(**cfg))
            modules[enc.component] = build(make, enc.slots(), tf.get, source)
            modules[tokenizer_names[enc.component]] = load_tokenizer(enc, cfg, tokenizer_folder)
        u = sf.unet_config
        up_attention = tuple(t.startswith("CrossAttn") for t in u["up_block_types"])
        get_unet, _ = unet_getter(tf, sf.ema)
        modules["unet"] = build(lambda: diffusers.UNet2DConditionModel.from_config(u),
                                K.unet_slots(u["layers_per_block"], up_attention), get_unet, source)
        if sf.vae_config is not None:
            v = sf.vae_config
            modules["vae"] = build(lambda: diffusers.AutoencoderKL.from_config(v),
                                   K.vae_slots(len(v["block_out_channels"]), sf.vae_prefix), tf.get, source)
    finally:
        tf.close()
    scheduler_cls, scheduler_config = sf.scheduler
    modules["scheduler"] = getattr(diffusers, scheduler_cls).from_config(scheduler_config)
    return modules


def load_vae(path: Path, scaling_factor: float, sample_size: int):
    """--vae: a diffusers VAE folder, or a file in the LDM layout (any prefix) or diffusers' own names."""
    import diffusers

    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae {path}: a VAE folder needs config.json (a diffusers AutoencoderKL folder)")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load --vae {path}: {str(e).strip().splitlines()[0]}") from None
        return vae.eval().requires_grad_(False)
    tf = TensorFile(path)
    keys = tf.shapes
    prefix = vae_prefix(keys)
    if prefix is None and "decoder.conv_out.weight" in keys:
        prefix = ""
    diffusers_layout = any(k.startswith("encoder.down_blocks.") for k in keys)
    if prefix is None:
        raise UserError(f"--vae {path.name} is not a VAE: no decoder weights among its {len(keys)} tensors")
    if diffusers_layout:
        config = vae_config(keys, "", sample_size, scaling_factor, diffusers_layout=True)
        slots = K.hf_slots("")
    else:
        config = vae_config(keys, prefix, sample_size, scaling_factor)
        slots = K.vae_slots(len(config["block_out_channels"]), prefix)
    try:
        return build(lambda: diffusers.AutoencoderKL.from_config(config), slots, tf.get, f"--vae {path.name}")
    finally:
        tf.close()


def to_single_file(modules: dict, family: str) -> dict[str, torch.Tensor]:
    """The inverse of loading: a diffusers checkpoint's modules as the original trainers' single file.

    SD 2.x files also carry what diffusers drops: the OpenCLIP tower's last block and its text projection.
    """
    unet, vae = modules["unet"], modules["vae"]
    up_attention = tuple(t.startswith("CrossAttn") for t in unet.config.up_block_types)
    out = K.write_state_dict(unet.state_dict(), K.unet_slots(unet.config.layers_per_block, up_attention))
    out |= K.write_state_dict(vae.state_dict(), K.vae_slots(len(vae.config.block_out_channels)))
    for enc in ENCODERS[family]:
        te = modules[enc.component]
        out |= K.write_state_dict(te.state_dict(), enc.slots())
        if enc.drop_last_layer:
            last, n = f"{enc.prefix}transformer.resblocks.", te.config.num_hidden_layers
            gen = torch.Generator().manual_seed(n)
            for key in [k for k in out if k.startswith(f"{last}{n - 1}.")]:
                out[f"{last}{n}." + key.removeprefix(f"{last}{n - 1}.")] = torch.randn(out[key].shape, generator=gen)
            hidden = te.config.hidden_size
            out[f"{enc.prefix}text_projection"] = torch.randn(hidden, hidden, generator=gen) / hidden**0.5
    return out
