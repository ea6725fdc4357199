"""Merge LoRA files into the torch weights before tracing, so engines run at full speed with no extra layers.

W <- W + scale * (alpha / rank) * up @ down, in fp32, for Linear, 1x1 conv and kxk LoCon conv weights.
The components are whichever of unet / text_encoder / text_encoder_2 the checkpoint has (SD1, SD2 and Taiyi,
whose text encoder is a BertModel: the first two; SDXL: all three). LoRA keys are looked up by the module names
of those torch modules, so a key for a component the checkpoint lacks is just a key that matches nothing.
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
from .lora_formats import COMPONENTS, KOHYA_PREFIXES, UNET, LoraFile, LoraModule, read_lora
from .lora_sgm import sgm_module_names, uses_sgm_names

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
    """LoRA files name CLIP modules `text_model.encoder...`; transformers 5 drops the `text_model.` level in
    CLIPTextModel (CLIPTextModelWithProjection keeps it), so text-encoder names are known both ways."""
    if component == UNET:
        return (name,)
    bare = name.removeprefix("text_model.")
    return (bare, "text_model." + bare)


def present_components(modules: dict) -> tuple[str, ...]:
    """The LoRA-targetable components this checkpoint has, in COMPONENTS order (SDXL refiners lack one)."""
    return tuple(c for c in COMPONENTS if modules.get(c) is not None)


def module_table(modules: dict, kohya: bool) -> dict[str, dict[str, torch.nn.Module]]:
    """Linear/Conv2d modules per component present, by the names LoRA files use (kohya: `lora_unet_a_b_c`,
    and for an SDXL UNet also its SGM names, `lora_unet_input_blocks_4_1_...`)."""
    tables = {}
    for comp in present_components(modules):
        model = modules[comp]
        sgm = sgm_module_names(model) if kohya and comp == UNET and uses_sgm_names(model) else {}
        table = {}
        for n, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            names = _aliases(comp, n) + ((sgm[n],) if n in sgm else ())
            for alias in names:
                if kohya:
                    table.update({prefix + alias.replace(".", "_"): m for prefix in KOHYA_PREFIXES[comp]})
                else:
                    table[alias] = m
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


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


def plan(lora: LoraFile, modules: dict, scale: float,
         allow_partial: bool) -> tuple[list[tuple[torch.nn.Module, torch.Tensor]], list[str]]:
    """Check the whole file against the checkpoint; returns (module, weight update) pairs and the keys left
    unmerged (only with allow_partial), nothing applied."""
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
    absent = sorted({m.component for m in unknown} - set(tables), key=COMPONENTS.index)
    why = "".join(f"it has no {c}; " for c in absent)  # e.g. SDXL's lora_te2_ keys in an SD1 checkpoint
    if not updates and not misfit:
        raise UserError(f"LoRA {name} ({lora.format}) matches nothing in this checkpoint; {why}first keys: "
                        f"{_first([m.keys[0] for m in unknown] or list(lora.leftover))}")
    if misfit:
        first = "; ".join(f"{m.keys[0]} {list(m.up.shape)}x{list(m.down.shape)} vs weight {list(t.weight.shape)}"
                          for m, t in misfit[:SHOWN_KEYS])
        raise UserError(f"LoRA {name} does not fit this checkpoint ({len(misfit)} of {len(lora.modules)} modules "
                        f"have other shapes; is it for another model family?): {first}")
    leftover = [m.keys[0] for m in unknown] + list(lora.leftover)
    if leftover and not allow_partial:
        raise UserError(f"LoRA {name}: {len(leftover)} keys match nothing in this checkpoint "
                        f"({why}pass --lora-allow-partial to merge the rest): {_first(leftover)}")
    return updates, leftover


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
        updates, skipped = plan(lora, modules, spec.scale, allow_partial)
        changed = {comp: 0 for comp in present_components(modules)}
        owner = {id(m): comp for comp in changed for m in modules[comp].modules()}
        with torch.no_grad():
            for target, delta in updates:
                target.weight += delta.to(target.weight.dtype)
                changed[owner[id(target)]] += 1
        nonzero = any(bool(delta.any()) for _, delta in updates)
        log(f"lora {spec.path.name} ({lora.format}) x{spec.scale:g}: "
            + ", ".join(f"{comp} {n} modules" for comp, n in changed.items())
            + (f"; {len(skipped)} keys skipped (--lora-allow-partial): {_first(skipped)}" if skipped else "")
            + ("" if nonzero else "; WARNING: every update is zero"))
        records.append(LoraRecord(file=spec.path.name, sha256=_sha256(spec.path), format=lora.format,
                                  scale=spec.scale, modules_changed=changed))
    return tuple(records)
