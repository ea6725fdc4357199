"""fp16 graphs: which parts stay fp32, how an fp16 module is traced, and the overflow screen. One place.

TensorRT 11 is strongly typed: an engine computes in the precisions its ONNX graph declares, so precision is
decided here, in the graph (research/gpu_runtime.md §3). An fp16 graph is the component's torch module cast to
fp16 and traced like the fp32 one (demoDiffusion's route): float32 in and out, Casts at its edges, the fused
`Attention` and `GroupNormalization` ops intact. GroupNormalization-21 and LayerNormalization keep their statistics
in fp32 (`stash_type` 1), so the norms need no rule of their own.

The policy, per family:

| part | stays fp32 | why |
|---|---|---|
| SDXL VAE (encoder and decoder) | when its config says `force_upcast` (the stock VAE does; the fp16-fix VAE does not) | StableDiffusionXLPipeline's own rule: its activations overflow fp16 and decode to NaN/black |
| attention inside the UNet | when the UNet config says `upcast_attention` (SD 2.1) | diffusers' flag for "scores in fp32"; SD 2.1 attention in fp16 gives black images (ORT's SD notes) |
| any component | when a module's fp32 activation exceeds fp16's range on the validation inputs | it would be inf in fp16 |

SD 1.x, SD 2.x base and Taiyi run every component in fp16, as NVIDIA's and ONNX Runtime's pipelines do.

The overflow screen reads the fp32 reference run itself: a forward hook on every submodule records the largest
|activation|, and one above 65504 (fp16's largest finite value) keeps the component fp32, naming the module. It
costs nothing extra, sees every module (ONNX Runtime's CPU provider computes most fp16 ops in fp32 between Casts
and so would hide an overflow; `onnx.reference` would catch one but needs minutes per convolution), and it is
the test NVIDIA's AutoCast and ONNX Runtime's SD tooling apply to decide which nodes stay fp32.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from sdrt.runtime.manifest import UNET, VAE_DECODER, VAE_ENCODER

PRECISIONS = ("fp32", "fp16")
FP16_MAX = 65504.0  # the largest finite fp16 value


@dataclass(frozen=True)
class ActivationPeak:
    """The largest |activation| of one fp32 reference run and the module that produced it; and the first module,
    in execution order, whose output fp16 cannot hold (where an fp16 run would turn inf), if any."""

    value: float
    module: str
    first_overflow: str | None = None

    @property
    def overflows_fp16(self) -> bool:
        return self.first_overflow is not None


def policy_fp32(family: str, modules: dict) -> dict[str, str]:
    """Components the family's policy keeps fp32 in an fp16 export, with the reason (the table above)."""
    keep = {}
    vae = modules.get("vae")
    if family == "sdxl" and vae is not None and bool(getattr(vae.config, "force_upcast", True)):
        reason = "the SDXL VAE's force_upcast (it overflows fp16; the fp16-fix VAE does not ask for it)"
        keep[VAE_DECODER] = keep[VAE_ENCODER] = reason
    return keep


def upcast_attention(name: str, modules: dict) -> bool:
    """Whether the component's fp16 graph computes attention in fp32 (the UNet config's upcast_attention)."""
    unet = modules.get("unet")
    return name == UNET and unet is not None and bool(getattr(unet.config, "upcast_attention", False))


@contextlib.contextmanager
def attention_in_fp32(enabled: bool):
    """While tracing, scaled-dot-product attention runs on fp32 copies of q, k and v: the graph gets
    Cast -> Attention (fp32) -> Cast around every attention instead of an fp16 Attention."""
    if not enabled:
        yield
        return
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def upcast(query, key, value, *args, **kwargs):
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        return sdpa(query.float(), key.float(), value.float(), *args, **kwargs).to(query.dtype)

    torch.nn.functional.scaled_dot_product_attention = upcast
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def activation_peak(module: torch.nn.Module):
    """Record the largest |activation| of every submodule's float outputs while the block runs.

    Yields a list that holds one ActivationPeak when the block ends (the first module that reached the peak).
    """
    found: list[ActivationPeak] = []
    best = {"value": 0.0, "module": "", "first_overflow": None}

    def hook(name):
        def record(_mod, _inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    peak, v = float(t.detach().abs().max()), best["value"]
                    if v == v and (peak != peak or peak > v):  # the first NaN, once found, stays
                        best["value"], best["module"] = peak, name
                    if best["first_overflow"] is None and not peak <= FP16_MAX:
                        best["first_overflow"] = name
        return record

    handles = [sub.register_forward_hook(hook(name or "(output)")) for name, sub in module.named_modules()]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        found.append(ActivationPeak(best["value"], best["module"], best["first_overflow"]))


def half_modules(modules: dict, uses: tuple[str, ...], needed_later: set[str]) -> dict:
    """The modules dict with the component's torch modules in fp16. A module no later component needs is cast
    in place (a full-size UNet never exists twice); one that is still needed (the VAE, shared by the decoder and
    the encoder) is copied first."""
    out = dict(modules)
    for name in uses:
        m = modules[name]
        if not isinstance(m, torch.nn.Module):
            continue
        out[name] = (copy.deepcopy(m) if name in needed_later else m).half()
    return out
