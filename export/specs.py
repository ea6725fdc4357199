"""One spec per exported submodel: wrapper module, I/O names and dtypes, dynamic axes, sample inputs.

Every component goes through the same path (export/exporter.py): trace -> ONNX -> validate -> manifest
entry, so nothing here knows about files or ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sdrt.runtime.families import TEXT_EMBEDS
from sdrt.runtime.manifest import UNET, VAE_DECODER, VAE_ENCODER, Axis, TensorSpec

# Most images one call may generate; the UNet sees twice as many rows under classifier-free guidance.
MAX_IMAGES = 16
# Resolution range relative to the native one (SD 1.5: 256..1024 px around 512).
MIN_SCALE, MAX_SCALE = 0.5, 2.0
# The batch of the trace example. Not 1: torch.export specialises a dimension traced at size 1.
EXAMPLE_BATCH = 2


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _float32(out):
    """Graph outputs are float32 whatever the module computes in (a no-op for an fp32 module)."""
    return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


class TextEncoderWrapper(torch.nn.Module):
    """input_ids -> the hidden state the pipeline conditions on (+ the projected pooled `text_embeds`).

    No attention mask, as the pipelines call it: CLIP and Taiyi's BERT attend to the padding too.
    Every wrapper takes and returns float32 tensors, whatever precision its module computes in: an fp16 graph
    casts at its edges, so the engine dir's I/O contract does not depend on the precision.
    """

    def __init__(self, text_encoder: torch.nn.Module, penultimate: bool = False, pooled: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate, self.pooled = penultimate, pooled

    def forward(self, input_ids: torch.Tensor):
        if not (self.penultimate or self.pooled):
            return _float32(self.text_encoder(input_ids, return_dict=False)[0])
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out[0]
        return _float32((hidden, out.text_embeds) if self.pooled else hidden)


class UNetWrapper(torch.nn.Module):
    """(sample, timestep[B] float32, encoder_hidden_states) -> noise prediction.

    The timestep stays float32 in an fp16 graph: diffusers computes the sinusoidal embedding in float32 and
    casts after it (fp16 cannot tell timestep 999.25 from 999.5).
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        dt = _dtype(self.unet)
        return _float32(self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), return_dict=False)[0])


class AddedCondUNetWrapper(UNetWrapper):
    """SDXL: the UNet also takes the pooled text embedding and the micro-conditioning time ids (float32 in any
    graph: they are sinusoid-embedded like the timestep)."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        dt = _dtype(self.unet)
        added = {"text_embeds": text_embeds.to(dt), "time_ids": time_ids}
        return _float32(self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), added_cond_kwargs=added,
                                  return_dict=False)[0])


class VaeDecoderWrapper(torch.nn.Module):
    """latent (already divided by the scaling factor) -> image in [-1, 1] (unclamped)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return _float32(self.vae.decode(latent.to(_dtype(self.vae)), return_dict=False)[0])


class VaeEncoderWrapper(torch.nn.Module):
    """image in [-1, 1] -> (mean, logvar) of the latent distribution; the runtime samples or takes the mean."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image.to(_dtype(self.vae)), return_dict=False)[0]
        return _float32((dist.mean, dist.logvar))


@dataclass(frozen=True)
class TextEncoderGeometry:
    name: str  # component name
    seq_len: int  # tokens per prompt (the tokenizer's model_max_length)
    hidden: int
    vocab_size: int
    output: str  # name of the hidden-state output
    penultimate: bool
    pooled_dim: int | None = None  # width of `text_embeds`, if this encoder emits it


@dataclass(frozen=True)
class Geometry:
    """The model sizes that shape every spec, read from the loaded checkpoint."""

    text_encoders: tuple[TextEncoderGeometry, ...]
    latent_channels: int
    vae_factor: int  # pixels per latent cell
    unet_multiple: int  # latent side must be a multiple of this (2 ** number of UNet downsamplers)
    native_latent: int  # latent side at the native resolution
    time_ids: int = 0  # length of the UNet's time_ids input; 0: the UNet takes no added conditioning

    @property
    def context_length(self) -> int:
        return self.text_encoders[0].seq_len

    @property
    def context_dim(self) -> int:
        return sum(t.hidden for t in self.text_encoders)

    @property
    def pooled_dim(self) -> int | None:
        return next((t.pooled_dim for t in self.text_encoders if t.pooled_dim), None)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    wrapper: Callable[[dict], torch.nn.Module]  # loaded diffusers/transformers modules -> export module
    uses: tuple[str, ...]  # the loaded modules the wrapper holds (freed once no later component uses them)
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


def _text_encoder(t: TextEncoderGeometry) -> ComponentSpec:
    hidden = TensorSpec(t.output, "float32", ("batch", t.seq_len, t.hidden))
    pooled = (TensorSpec(TEXT_EMBEDS, "float32", ("batch", t.pooled_dim)),) if t.pooled_dim else ()
    return ComponentSpec(
        name=t.name,
        wrapper=lambda m: TextEncoderWrapper(m[t.name], t.penultimate, bool(t.pooled_dim)),
        uses=(t.name,),
        inputs=(TensorSpec("input_ids", "int64", ("batch", t.seq_len)),),
        outputs=(hidden, *pooled),
        axes={"batch": _batch(2 * MAX_IMAGES)},
        sample_inputs=lambda s, gen: (torch.randint(0, t.vocab_size, (s["batch"], t.seq_len), generator=gen),),
    )


def _unet(g: Geometry, lat: Axis) -> ComponentSpec:
    f32, c = "float32", g.latent_channels
    inputs = [
        TensorSpec("sample", f32, ("batch", c, "latent_height", "latent_width")),
        TensorSpec("timestep", f32, ("batch",)),
        TensorSpec("encoder_hidden_states", f32, ("batch", g.context_length, g.context_dim)),
    ]
    if g.time_ids:
        inputs += [TensorSpec(TEXT_EMBEDS, f32, ("batch", g.pooled_dim)),
                   TensorSpec("time_ids", f32, ("batch", g.time_ids))]

    def sample_inputs(s, gen):
        b = s["batch"]
        base = (
            _randn(gen, b, c, s["latent_height"], s["latent_width"]),
            # Fractional timesteps, as Euler-type samplers pass them.
            torch.rand(b, generator=gen) * 999.0,
            _randn(gen, b, g.context_length, g.context_dim),
        )
        if not g.time_ids:
            return base
        # Sizes and crop offsets in pixels, as the pipeline passes them.
        return (*base, _randn(gen, b, g.pooled_dim), torch.rand(b, g.time_ids, generator=gen) * 1024.0)

    return ComponentSpec(
        name=UNET,
        wrapper=lambda m: (AddedCondUNetWrapper if g.time_ids else UNetWrapper)(m["unet"]),
        uses=("unet",),
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", f32, ("batch", c, "latent_height", "latent_width")),),
        axes={"batch": _batch(2 * MAX_IMAGES), "latent_height": lat, "latent_width": lat},
        sample_inputs=sample_inputs,
    )


def build_specs(g: Geometry) -> dict[str, ComponentSpec]:
    f32 = "float32"
    lat = _latent_axis(g)
    pix = _latent_axis(g, g.vae_factor)
    c = g.latent_channels
    vae_decoder = ComponentSpec(
        name=VAE_DECODER,
        wrapper=lambda m: VaeDecoderWrapper(m["vae"]),
        uses=("vae",),
        inputs=(TensorSpec("latent", f32, ("batch", c, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", f32, ("batch", 3, f"latent_height*{g.vae_factor}",
                                            f"latent_width*{g.vae_factor}")),),
        axes={"batch": _batch(MAX_IMAGES), "latent_height": lat, "latent_width": lat},
        sample_inputs=lambda s, gen: (_randn(gen, s["batch"], c, s["latent_height"], s["latent_width"]),),
    )
    vae_encoder = ComponentSpec(
        name=VAE_ENCODER,
        wrapper=lambda m: VaeEncoderWrapper(m["vae"]),
        uses=("vae",),
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
    specs = [*(_text_encoder(t) for t in g.text_encoders), _unet(g, lat), vae_decoder, vae_encoder]
    return {s.name: s for s in specs}
