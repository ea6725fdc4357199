"""Random LoRA files for tiny test models, written in each format sdrt reads, plus the textbook merge.

Components are whichever of unet / text_encoder / text_encoder_2 the modules dict holds; text encoders may be
CLIP (SD1, SDXL) or BERT (Taiyi).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
BERT_ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Entry:
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # dotted module path
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


def _lowrank(module: torch.nn.Module, rank: int, gen: torch.Generator, conv_kernel: bool) -> tuple:
    w = module.weight
    if w.ndim == 4:
        k = w.shape[2:] if conv_kernel else (1, 1)
        down = torch.randn(rank, w.shape[1], *k, generator=gen) * 0.2
        up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * 0.2
    else:
        down = torch.randn(rank, w.shape[1], generator=gen) * 0.2
        up = torch.randn(w.shape[0], rank, generator=gen) * 0.2
    return down, up


def _file_name(model: torch.nn.Module, name: str) -> str:
    """Files name CLIP modules as transformers 4 did, under `text_model.`; transformers 5's CLIPTextModel has no
    such level (CLIPTextModelWithProjection keeps it). BERT names are the module names."""
    if type(model).__name__ == "CLIPTextModel" and not name.startswith("text_model."):
        return "text_model." + name
    return name


def _is_layer(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))


def random_entries(modules: dict, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                   text_encoder: bool = True, attention_only: bool = False, every_layer: bool = False,
                   exclude: tuple[str, ...] = ()) -> list[Entry]:
    """Attention projections (+ UNet proj_in 1x1 conv, resnet conv1 3x3 LoCon, TE fc1 / BERT intermediate unless
    attention_only), in each component present; `every_layer`: every Linear/Conv2d (kxk convs as LoCon);
    modules whose name contains a string of `exclude` are skipped."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, m in modules["unet"].named_modules():
        last = name.rsplit(".", 2)
        is_attn = any(name.endswith(f".{p}") for p in UNET_ATTN) and ".attn" in name
        extra = not attention_only and (name.endswith("attentions.0.proj_in") or name.endswith("resnets.0.conv1"))
        if (is_attn or extra or every_layer and _is_layer(m)) and not any(x in name for x in exclude):
            down, up = _lowrank(m, rank, gen, conv_kernel=every_layer or last[-1] == "conv1")
            out.append(Entry("unet", name, down, up, alpha))
    for comp in TEXT_ENCODERS if text_encoder else ():
        model = modules.get(comp)
        for name, m in model.named_modules() if model is not None else ():
            attn = any(name.endswith(f".{p}") for p in TE_ATTN + BERT_ATTN)
            mlp = not attention_only and name.endswith((".mlp.fc1", ".intermediate.dense"))
            if (attn or mlp or every_layer and _is_layer(m)) and not any(x in name for x in exclude):
                down, up = _lowrank(m, rank, gen, conv_kernel=False)
                out.append(Entry(comp, _file_name(model, name), down, up, alpha))
    return out


def write_kohya(entries: list[Entry], path: Path, *, te_prefix: str = "lora_te_",
                unet_names: dict[str, str] | None = None) -> Path:
    """kohya keys; `te_prefix` "lora_te1_" for SDXL files (text_encoder_2 is always `lora_te2_`); `unet_names`
    renames UNet modules first (e.g. to the SGM tree sd-scripts uses for SDXL)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_"}
    sd = {}
    for e in entries:
        module = (unet_names or {}).get(e.module, e.module) if e.component == "unet" else e.module
        key = prefixes[e.component] + module.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = e.down.contiguous()
        sd[f"{key}.lora_up.weight"] = e.up.contiguous()
        if e.alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(e.alpha)
    save_file(sd, path)
    return path


def write_attn_procs(entries: list[Entry], path: Path) -> Path:
    """Legacy `unet.save_attn_procs` layout: unprefixed, `.processor.to_q_lora.down.weight`, no alpha."""
    sd = {}
    for e in entries:
        assert e.component == "unet" and e.alpha is None
        block, proj = e.module.rsplit(".", 1) if not e.module.endswith("to_out.0") else (e.module[:-9], "to_out")
        sd[f"{block}.processor.{proj}_lora.down.weight"] = e.down.contiguous()
        sd[f"{block}.processor.{proj}_lora.up.weight"] = e.up.contiguous()
    if path.suffix == ".bin":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    return path


def write_diffusers(entries: list[Entry], path: Path) -> Path:
    """0.21-0.26 non-PEFT: `unet.<m>.lora.down.weight`, `text_encoder.<m>.lora_linear_layer.down.weight`."""
    sd = {}
    for e in entries:
        layer = "lora" if e.component == "unet" else "lora_linear_layer"
        sd[f"{e.component}.{e.module}.{layer}.down.weight"] = e.down.contiguous()
        sd[f"{e.component}.{e.module}.{layer}.up.weight"] = e.up.contiguous()
        if e.alpha is not None:
            sd[f"{e.component}.{e.module}.alpha"] = torch.tensor(e.alpha)
    save_file(sd, path)
    return path


def write_peft(entries: list[Entry], path: Path, rank: int, alpha: float) -> Path:
    """PEFT keys with the `lora_adapter_metadata` header diffusers' save_lora_weights writes."""
    sd, meta = {}, {}
    for e in entries:
        sd[f"{e.component}.{e.module}.lora_A.weight"] = e.down.contiguous()
        sd[f"{e.component}.{e.module}.lora_B.weight"] = e.up.contiguous()
    for comp in {e.component for e in entries}:
        targets = sorted({e.module.rsplit(".", 1)[-1] if not e.module.endswith("to_out.0") else "to_out.0"
                          for e in entries if e.component == comp})
        meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": targets})
    save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def textbook_merge(modules: dict, entries: list[Entry], scale: float) -> None:
    """W += scale * alpha / r * reshape(up.flatten(1) @ down.flatten(1)), in place, fp32."""
    with torch.no_grad():
        for e in entries:
            named = dict(modules[e.component].named_modules())
            target = named.get(e.module) or named[e.module.removeprefix("text_model.")]
            r = e.down.shape[0]
            s = scale * (e.alpha / r if e.alpha else 1.0)
            target.weight += s * (e.up.flatten(1) @ e.down.flatten(1)).reshape(target.weight.shape)
