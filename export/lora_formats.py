"""Read a LoRA file in any common format into one normal form: per target module, (down, up, alpha).

Formats, detected from the keys (research/lora_taiyi_schedulers.md §1):
- `kohya`: kohya-ss / A1111, `lora_unet_<path_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
  `lora_te_` / `lora_te1_` name the text encoder, `lora_te2_` SDXL's second one (SDXL UNet names: lora_sgm.py);
- `diffusers-attn-procs`: legacy `unet.save_attn_procs`, `<blk>.attn1.processor.to_q_lora.down.weight`, no alpha
  (diffusers >= 0.40 silently loads nothing from these files; we do);
- `diffusers`: 0.21-0.26 non-PEFT, `unet.<module>.lora.down.weight`, `text_encoder.<module>.lora_linear_layer.*`;
- `peft`: `unet.<module>.lora_A.weight` / `lora_B.weight`, alpha from the `lora_adapter_metadata` header.
The diffusers and PEFT formats prefix keys with the component: `unet.`, `text_encoder.`, `text_encoder_2.`.
LyCORIS LoHa/LoKr, LoCon-CP (`lora_mid`) and DoRA are refused by name rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)  # the order of log lines and manifest records
# kohya name prefixes per component (sd-scripts lora.py: `lora_te` for SD1/SD2, `lora_te1`/`lora_te2` for SDXL).
KOHYA_PREFIXES = {UNET: ("lora_unet_",), TEXT_ENCODER: ("lora_te_", "lora_te1_"), TEXT_ENCODER_2: ("lora_te2_",)}
_ANY_KOHYA = tuple(p for prefixes in KOHYA_PREFIXES.values() for p in prefixes)
# Key fragments of formats whose merge is not the LoRA product (named in the error).
UNSUPPORTED = {
    ".hada_": "LyCORIS LoHa",
    ".lokr_": "LyCORIS LoKr",
    ".dora_scale": "DoRA",
    ".lora_magnitude_vector": "DoRA",
    ".lora_mid.": "LoCon with CP decomposition (lora_mid)",
}
# Legacy attn-procs projection names -> module names, per component. diffusers wrote text-encoder entries only
# for CLIP (`text_encoder_attn_modules` raises for any other class), so a BERT text encoder gets CLIP names,
# which match nothing there and are reported.
_CLIP_PROJ = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
LEGACY_PROJ = {
    UNET: {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    TEXT_ENCODER: _CLIP_PROJ,
    TEXT_ENCODER_2: _CLIP_PROJ,
}


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update: W += scale * alpha_scale * up @ down (conv shapes included)."""

    component: str  # one of COMPONENTS
    name: str  # the name as the file spells it (kohya: lora_unet_..., else the module path)
    down: torch.Tensor  # [r, in(, kh, kw)]
    up: torch.Tensor  # [out, r(, 1, 1)]
    alpha_scale: float  # alpha / r (or alpha / sqrt(r) for rsLoRA); 1.0 when the file stores no alpha
    keys: tuple[str, ...]  # the file keys this module consumed


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str
    modules: tuple[LoraModule, ...]
    leftover: tuple[str, ...]  # keys no rule consumed
    kohya_names: bool  # module names are kohya's underscore form (resolved against the model's module table)


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata. `.bin`/`.pt` load weights-only: a pickle that carries code is refused."""
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise UserError(f"corrupt LoRA file {path}: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it may not support
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, which would run the code: name the culprit instead.
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it calls {culprit.group(1)}" if culprit else "it is not a plain tensor pickle"
        raise UserError(f"refused LoRA file {path}: the pickle carries code ({what}); only tensors are loaded, "
                        "use .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read LoRA file {path}: {e}") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"LoRA file {path} does not hold a flat dict of tensors")
    return sd, {}


def detect_format(keys: list[str]) -> str:
    for fragment, name in UNSUPPORTED.items():
        if any(fragment in k for k in keys):
            raise UserError(f"unsupported LoRA format: {name} (sdrt merges LoRA and LoCon)")
    if any(k.startswith(_ANY_KOHYA) for k in keys):
        return "kohya"
    if any(re.search(r"\.to_(q|k|v|out)_lora\.(down|up)\.weight$", k) for k in keys):
        return "diffusers-attn-procs"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    raise UserError("not a LoRA file: no kohya, diffusers or PEFT LoRA keys found")


def _component(key: str) -> tuple[str, str]:
    """(component, key without its component prefix); unprefixed keys belong to the UNet (legacy files)."""
    for comp in COMPONENTS:
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    return UNET, key


def _pairs(sd: dict, pattern: str, alpha_of) -> tuple[list[LoraModule], set[str]]:
    """Group the keys matched by `pattern` (groups: module, down|up|A|B) into modules with both halves."""
    found: dict[str, dict] = {}
    for key in sd:
        m = re.fullmatch(pattern, key)
        if m:
            part = {"A": "down", "B": "up"}.get(m.group(2), m.group(2))  # PEFT: lora_A is down, lora_B is up
            found.setdefault(m.group(1), {})[part] = key
    modules, used = [], set()
    for module, parts in found.items():
        if set(parts) != {"down", "up"}:
            continue  # a half pair stays a leftover key
        down, up = sd[parts["down"]].float(), sd[parts["up"]].float()
        alpha_scale, alpha_key = alpha_of(module, down.shape[0])
        keys = tuple(parts.values()) + ((alpha_key,) if alpha_key else ())
        comp, name = _component(module)
        modules.append(LoraModule(comp, name, down, up, alpha_scale, keys))
        used.update(keys)
    return modules, used


def _stored_alpha(sd: dict, key: str, rank: int) -> tuple[float, str | None]:
    """kohya/diffusers `.alpha` tensor: alpha / r; absent or 0 means alpha = r (sd-scripts lora.py)."""
    if key in sd:
        alpha = float(sd[key].float().item())
        return (alpha / rank if alpha else 1.0), key
    return 1.0, None


def _peft_alpha(metadata: dict[str, str]):
    """alpha / r from the `lora_adapter_metadata` header (`<component>.lora_alpha`, `.alpha_pattern`, ...)."""
    raw = metadata.get("lora_adapter_metadata")
    meta = json.loads(raw) if raw else {}

    def alpha_of(module: str, rank: int) -> tuple[float, None]:
        prefix, name = _component(module)  # header keys carry the component prefix
        if meta.get(f"{prefix}.use_dora"):
            raise UserError("unsupported LoRA format: DoRA (sdrt merges LoRA and LoCon)")
        alpha = meta.get(f"{prefix}.lora_alpha", rank)
        for pattern, value in (meta.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):  # peft's get_pattern_key rule
                alpha = value
        root = math.sqrt(rank) if meta.get(f"{prefix}.use_rslora") else rank
        return float(alpha) / root, None

    return alpha_of


def read_lora(path: Path) -> LoraFile:
    sd, metadata = load_state_dict(Path(path))
    if not sd:
        raise UserError(f"LoRA file {path} is empty")
    fmt = detect_format(list(sd))
    if fmt == "kohya":
        modules, used = _pairs(sd, r"(lora_(?:unet|te[12]?)_.+)\.lora_(down|up)\.weight",
                               lambda m, r: _stored_alpha(sd, f"{m}.alpha", r))
        modules = [LoraModule(_kohya_component(m.name), m.name, m.down, m.up, m.alpha_scale, m.keys)
                   for m in modules]
    elif fmt == "diffusers-attn-procs":
        modules, used = _pairs(sd, r"(.+\.to_(?:q|k|v|out)_lora)\.(down|up)\.weight", lambda m, r: (1.0, None))
        modules = [_legacy_module(m) for m in modules]
    elif fmt == "diffusers":
        modules, used = _pairs(sd, r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight",
                               lambda m, r: _stored_alpha(sd, f"{m}.alpha", r))
    else:
        modules, used = _pairs(sd, r"(.+)\.lora_([AB])\.weight", _peft_alpha(metadata))
    return LoraFile(Path(path), fmt, tuple(modules), tuple(sorted(set(sd) - used)), kohya_names=fmt == "kohya")


def _kohya_component(name: str) -> str:
    return next(comp for comp, prefixes in KOHYA_PREFIXES.items() if name.startswith(prefixes))


def _legacy_module(m: LoraModule) -> LoraModule:
    """`<blk>.attn1.processor.to_q_lora` -> `<blk>.attn1.to_q`; text encoder `...self_attn.to_q_lora` -> `q_proj`."""
    path, proj = m.name.rsplit(".", 1)
    path = path.removesuffix(".processor")
    return LoraModule(m.component, f"{path}.{LEGACY_PROJ[m.component][proj]}", m.down, m.up, m.alpha_scale, m.keys)
