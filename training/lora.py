"""LoRA in the kohya-ss (sd-scripts) format: training adapters, the key names, saving and merging.

Key names follow sd-scripts networks/lora.py: `lora_unet_` / `lora_te_` + the diffusers / transformers module
path with "." replaced by "_", then `.lora_down.weight` [r, in], `.lora_up.weight` [out, r] and `.alpha`
(a 0-dim tensor). Merge math (sd-scripts networks/merge_lora.py, research note lora_taiyi_schedulers.md §1.0):

    W <- W + multiplier * (alpha / rank) * up @ down

Training attaches forward hooks, so the frozen model keeps its module tree (and thus its key names) intact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RANK = 8
ALPHA = 4.0  # scale alpha/rank = 0.5, so a merge that forgets the factor is visibly wrong
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_PREFIX, TE_PREFIX = "lora_unet", "lora_te"


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0....attn1.to_q` -> `lora_unet_down_blocks_0_..._attn1_to_q`."""
    return prefix + "_" + module_path.replace(".", "_")


def target_modules(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """kohya name -> Linear for the UNet attention projections and the text encoder self-attention projections."""
    # kohya names the text encoder's modules `text_model.encoder...` (transformers 4.x CLIPTextModel);
    # transformers 5 dropped the `text_model` wrapper, so the prefix is put back where it is missing.
    te_root = getattr(text_encoder, "text_model", text_encoder)
    found = {}
    for prefix, path_prefix, root, targets in (
        (UNET_PREFIX, "", unet, UNET_TARGETS),
        (TE_PREFIX, "text_model.", te_root, TE_TARGETS),
    ):
        for path, module in root.named_modules():
            if isinstance(module, torch.nn.Linear) and any(path.endswith("." + t) for t in targets):
                found[kohya_name(prefix, path_prefix + path)] = module
    return found


class LoraAdapter(torch.nn.Module):
    """Trainable low-rank deltas attached to frozen Linear layers through forward hooks."""

    def __init__(self, unet, text_encoder, rank: int, alpha: float, seed: int):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.targets = target_modules(unet, text_encoder)
        gen = torch.Generator().manual_seed(seed)
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        self.hooks = []
        for name, linear in self.targets.items():
            # kohya init: down ~ kaiming-uniform-like, up = 0, so training starts at the base model.
            bound = 1.0 / linear.in_features**0.5
            self.down[name] = torch.nn.Parameter((torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) * bound)
            self.up[name] = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
            self.hooks.append(linear.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def add_delta(module, args, output):
            return output + (self.alpha / self.rank) * (args[0] @ self.down[name].T @ self.up[name].T)

        return add_delta

    def remove(self) -> None:
        """Detach from the model; the base weights were never touched."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        """The kohya-ss tensors, fp32."""
        sd = {}
        for name in self.targets:
            sd[f"{name}.lora_down.weight"] = self.down[name].detach().clone().contiguous()
            sd[f"{name}.lora_up.weight"] = self.up[name].detach().clone().contiguous()
            sd[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return sd


def save_kohya(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Plain safetensors. No `ss_*` metadata: safetensors writes metadata in hash order, so files would differ
    byte-wise between identical runs; rank and alpha are in the tensors anyway."""
    save_file(sd, str(path))


def merge_kohya(unet, text_encoder, lora: dict[str, torch.Tensor] | Path, multiplier: float = 1.0) -> int:
    """Merge a kohya LoRA into the models in place: W += multiplier * alpha/rank * up @ down. Returns the count."""
    sd = load_file(str(lora)) if isinstance(lora, (str, Path)) else lora
    targets = target_modules(unet, text_encoder)
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in sd if k.endswith(".lora_down.weight")}
    unknown = names - targets.keys()
    if unknown:
        raise KeyError(f"LoRA modules not in the model: {sorted(unknown)[:3]} ...")
    with torch.no_grad():
        for name in names:
            down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(sd[f"{name}.alpha"].item()) if f"{name}.alpha" in sd else 0.0
            alpha = alpha or float(rank)  # kohya: a missing or zero alpha means alpha = rank
            weight = targets[name].weight
            weight += (multiplier * alpha / rank * (up @ down)).to(weight.dtype)
    return len(names)
