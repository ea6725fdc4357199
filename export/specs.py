"""One spec per exported submodel: wrapper module, I/O names and dtypes, dynamic axes, sample inputs.

Every component goes through the same path (export/exporter.py): trace -> ONNX -> validate -> manifest
entry, so nothing here knows about files or ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sdrt.runtime.manifest import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, Axis, TensorSpec

# Most images one call may generate; the UNet sees twice as many rows under classifier-free guidance.
MAX_IMAGES = 16
# Resolution range relative to the native one (SD 1.5: 256..1024 px around 512).
MIN_SCALE, MAX_SCALE = 0.5, 2.0
# The batch of the trace example. Not 1: torch.export specialises a dimension traced at size 1.
EXAMPLE_BATCH = 2


class TextEncoderWrapper(torch.nn.Module):
    """input_ids -> last_hidden_state, without the pooler (SD 1.x conditions on the last hidden state)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetWrapper(torch.nn.Module):
    """(sample, timestep[B] float32, encoder_hidden_states) -> noise prediction."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    """latent (already divided by the scaling factor) -> image in [-1, 1] (unclamped)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """image in [-1, 1] -> (mean, logvar) of the latent distribution; the runtime samples or takes the mean."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image, return_dict=False)[0]
        return dist.mean, dist.logvar


@dataclass(frozen=True)
class Geometry:
    """The model sizes that shape every spec, read from the loaded checkpoint."""

    seq_len: int  # tokenizer model_max_length
    text_hidden: int
    vocab_size: int
    latent_channels: int
    vae_factor: int  # pixels per latent cell
    unet_multiple: int  # latent side must be a multiple of this (2 ** number of UNet downsamplers)
    native_latent: int  # latent side at the native resolution


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    wrapper: Callable[[dict], torch.nn.Module]  # loaded diffusers/transformers modules -> export module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis]
    # (axis values) -> example inputs; the export traces one set, validation runs another.
    sample_inputs: Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]

    def example_sizes(self) -> dict[str, int]:
        return {name: EXAMPLE_BATCH if name == "batch" else ax.opt for name, ax in self.axes.items()}

    def validation_sizes(self) -> dict[str, int]:
        """Sizes other than the trace example's: batch 1, and a non-square size one step off the native one."""
        sizes = {}
        for i, (name, ax) in enumerate(self.axes.items()):
            if name == "batch":
                sizes[name] = 1
            else:
                step = ax.multiple_of * (1 if i % 2 else -1)
                sizes[name] = ax.opt + step if ax.check(ax.opt + step) else ax.opt - step
        return sizes


def _latent_axis(g: Geometry, scale: int = 1) -> Axis:
    """A spatial axis in latent cells (scale 1) or pixels (scale = vae factor)."""
    mult = g.unet_multiple
    lo = max(mult, int(g.native_latent * MIN_SCALE) // mult * mult)
    hi = int(g.native_latent * MAX_SCALE) // mult * mult
    return Axis(min=lo * scale, opt=g.native_latent * scale, max=hi * scale, multiple_of=mult * scale)


def _batch(max_rows: int) -> Axis:
    return Axis(min=1, opt=1, max=max_rows)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def build_specs(g: Geometry) -> dict[str, ComponentSpec]:
    f32 = "float32"
    lat = _latent_axis(g)
    pix = _latent_axis(g, g.vae_factor)
    c = g.latent_channels
    text_encoder = ComponentSpec(
        name=TEXT_ENCODER,
        wrapper=lambda m: TextEncoderWrapper(m["text_encoder"]),
        inputs=(TensorSpec("input_ids", "int64", ("batch", g.seq_len)),),
        outputs=(TensorSpec("last_hidden_state", f32, ("batch", g.seq_len, g.text_hidden)),),
        axes={"batch": _batch(2 * MAX_IMAGES)},
        sample_inputs=lambda s, gen: (torch.randint(0, g.vocab_size, (s["batch"], g.seq_len), generator=gen),),
    )
    unet = ComponentSpec(
        name=UNET,
        wrapper=lambda m: UNetWrapper(m["unet"]),
        inputs=(
            TensorSpec("sample", f32, ("batch", c, "latent_height", "latent_width")),
            TensorSpec("timestep", f32, ("batch",)),
            TensorSpec("encoder_hidden_states", f32, ("batch", g.seq_len, g.text_hidden)),
        ),
        outputs=(TensorSpec("noise_pred", f32, ("batch", c, "latent_height", "latent_width")),),
        axes={"batch": _batch(2 * MAX_IMAGES), "latent_height": lat, "latent_width": lat},
        sample_inputs=lambda s, gen: (
            _randn(gen, s["batch"], c, s["latent_height"], s["latent_width"]),
            # Fractional timesteps, as Euler-type samplers pass them.
            torch.rand(s["batch"], generator=gen) * 999.0,
            _randn(gen, s["batch"], g.seq_len, g.text_hidden),
        ),
    )
    vae_decoder = ComponentSpec(
        name=VAE_DECODER,
        wrapper=lambda m: VaeDecoderWrapper(m["vae"]),
        inputs=(TensorSpec("latent", f32, ("batch", c, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", f32, ("batch", 3, f"latent_height*{g.vae_factor}",
                                            f"latent_width*{g.vae_factor}")),),
        axes={"batch": _batch(MAX_IMAGES), "latent_height": lat, "latent_width": lat},
        sample_inputs=lambda s, gen: (_randn(gen, s["batch"], c, s["latent_height"], s["latent_width"]),),
    )
    vae_encoder = ComponentSpec(
        name=VAE_ENCODER,
        wrapper=lambda m: VaeEncoderWrapper(m["vae"]),
        inputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
        outputs=tuple(
            TensorSpec(n, f32, ("batch", c, f"image_height/{g.vae_factor}", f"image_width/{g.vae_factor}"))
            for n in ("latent_mean", "latent_logvar")
        ),
        axes={"batch": _batch(MAX_IMAGES), "image_height": pix, "image_width": pix},
        sample_inputs=lambda s, gen: (
            torch.rand(s["batch"], 3, s["image_height"], s["image_width"], generator=gen) * 2 - 1,
        ),
    )
    return {s.name: s for s in (text_encoder, unet, vae_decoder, vae_encoder)}
