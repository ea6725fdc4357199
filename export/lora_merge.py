"""Merge LoRA files into the torch weights before tracing, so engines run at full speed with no extra layers.

W <- W + scale * (alpha / rank) * up @ down, in fp32, for Linear, 1x1 conv and kxk LoCon conv weights.
Never silent: every LoRA reports the modules it changed per component, and keys that match nothing, shapes
that do not fit, or leftover keys (unless allowed) fail the export naming the first few offenders.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import LoraRecord

from .checkpoint import resolve_path
from .lora_formats import TEXT_ENCODER, UNET, LoraFile, LoraModule, read_lora

SHOWN_KEYS = 3  # offending keys named in an error


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, arg: str) -> LoraSpec:
        """`FILE[:SCALE]`; a colon whose tail is not a number belongs to the path."""
        head, sep, tail = arg.rpartition(":")
        if sep:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(arg), 1.0)


def _aliases(component: str, name: str) -> tuple[str, ...]:
    """LoRA files name CLIP modules `text_model.encoder...`; transformers 5 drops the `text_model.` level."""
    if component != TEXT_ENCODER:
        return (name,)
    bare = name.removeprefix("text_model.")
    return (bare, "text_model." + bare)


def module_table(modules: dict, kohya: bool) -> dict[str, dict[str, torch.nn.Module]]:
    """Linear/Conv2d modules per component by the names LoRA files use (kohya: `lora_unet_a_b_c`)."""
    tables = {}
    for comp, prefix in ((UNET, "lora_unet_"), (TEXT_ENCODER, "lora_te_")):
        table = {}
        for n, m in modules[comp].named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                for alias in _aliases(comp, n):
                    table[prefix + alias.replace(".", "_") if kohya else alias] = m
        tables[comp] = table
    return tables


def delta_weight(m: LoraModule, shape: torch.Size) -> torch.Tensor | None:
    """up @ down in the target weight's shape, or None if it cannot have that shape."""
    up, down = m.up.float(), m.down.float()
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        return None
    up2 = up.flatten(1)
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        if len(shape) != 4:
            return None
        delta = torch.einsum("or,rihw->oihw", up2, down)  # LoCon: kxk down conv, 1x1 up conv
    else:
        if up2.shape[1] != down.flatten(1).shape[0]:
            return None
        delta = up2 @ down.flatten(1)
    if delta.numel() != shape.numel() or delta.shape[0] != shape[0]:
        return None
    return delta.reshape(shape)  # Linear LoRA on a 1x1 conv (SD1 proj_in/out) and the reverse


def _name_keys(mods: list[LoraModule]) -> str:
    return ", ".join(m.keys[0] for m in mods[:SHOWN_KEYS]) + (", ..." if len(mods) > SHOWN_KEYS else "")


def plan(lora: LoraFile, modules: dict, scale: float, allow_partial: bool) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Check the whole file against the checkpoint; returns (module, weight update) pairs, nothing applied."""
    tables = module_table(modules, lora.kohya_names)
    name = lora.path.name
    unknown, misfit, updates = [], [], []
    for m in lora.modules:
        target = tables.get(m.component, {}).get(m.name)
        if target is None:
            unknown.append(m)
            continue
        delta = delta_weight(m, target.weight.shape)
        if delta is None:
            misfit.append((m, target))
        else:
            updates.append((target, delta * (scale * m.alpha_scale)))
    if not updates:
        raise UserError(f"LoRA {name} ({lora.format}) matches nothing in this checkpoint; first keys: "
                        f"{_name_keys(unknown) or ', '.join(lora.leftover[:SHOWN_KEYS])}")
    if misfit:
        first = "; ".join(f"{m.keys[0]} {list(m.up.shape)}x{list(m.down.shape)} vs weight {list(t.weight.shape)}"
                          for m, t in misfit[:SHOWN_KEYS])
        raise UserError(f"LoRA {name} does not fit this checkpoint ({len(misfit)} of {len(lora.modules)} modules "
                        f"have other shapes; is it for another model family?): {first}")
    leftover = [m.keys[0] for m in unknown] + list(lora.leftover)
    if leftover and not allow_partial:
        raise UserError(f"LoRA {name}: {len(leftover)} keys match nothing in this checkpoint "
                        f"(pass --lora-allow-partial to merge the rest): {', '.join(leftover[:SHOWN_KEYS])}"
                        + (", ..." if len(leftover) > SHOWN_KEYS else ""))
    return updates


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def merge_loras(specs: tuple[LoraSpec, ...], modules: dict, allow_partial: bool,
                log: Callable[[str], None]) -> tuple[LoraRecord, ...]:
    """Merge each LoRA in order into `modules` (in place, fp32); returns what the manifest records."""
    records = []
    for spec in specs:
        spec = LoraSpec(resolve_path(spec.path), spec.scale)  # `demo/lora/...`: the shipped demo LoRA
        lora = read_lora(spec.path)
        updates = plan(lora, modules, spec.scale, allow_partial)
        changed = {UNET: 0, TEXT_ENCODER: 0}
        owner = {id(m): comp for comp in changed for m in modules[comp].modules()}
        with torch.no_grad():
            for target, delta in updates:
                target.weight += delta.to(target.weight.dtype)
                changed[owner[id(target)]] += 1
        nonzero = any(bool(delta.any()) for _, delta in updates)
        log(f"lora {spec.path.name} ({lora.format}) x{spec.scale:g}: unet {changed[UNET]} modules, "
            f"text_encoder {changed[TEXT_ENCODER]} modules" + ("" if nonzero else "; WARNING: every update is zero"))
        records.append(LoraRecord(file=spec.path.name, sha256=_sha256(spec.path), format=lora.format,
                                  scale=spec.scale, modules_changed=changed))
    return tuple(records)
