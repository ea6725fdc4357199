"""manifest.json: the one contract between the exporter and every runtime (Python, C++ embedders).

The exporter writes it with `Manifest.save`, the runtime reads it with `Manifest.load`; both use the names and
the format version defined here. docs/engine-dir.md documents the same format for embedders.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path

from .errors import UserError

FORMAT_NAME = "sdrt-engine-dir"
# 2: several text encoders (SDXL), `tokenizers` per text encoder, `conditioning`, `vae`, effective scheduler config.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 dirs (SD 1.x only) are read by migrating them (`_migrate_v1`)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SCHEDULER_FILE = "scheduler.json"

# Component names, in export order. Their I/O names are part of the contract.
TEXT_ENCODER, TEXT_ENCODER_2 = "text_encoder", "text_encoder_2"
UNET, VAE_DECODER, VAE_ENCODER = "unet", "vae_decoder", "vae_encoder"
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER)
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl", "taiyi")
# The SDXL UNet's micro-conditioning, in the order of its `time_ids` input (diffusers' _get_add_time_ids).
SDXL_TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


@dataclass(frozen=True)
class Axis:
    """A dynamic dimension: the inclusive range the graph (and later the TensorRT profile) accepts."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def check(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple_of == 0

    def describe(self) -> str:
        step = f", multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
        return f"{self.min}..{self.max}{step}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A dim is a fixed int or the name of an axis of the component."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", "float16"
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Validation:
    """The parity check an artifact passed before it was accepted."""

    reference: str  # what it was compared with, e.g. "torch fp32"
    max_abs_error: float
    threshold: float
    shapes: dict[str, list[int]]  # the input shapes of the check (not those of the export example)
    tolerance: str | None = None  # the named rule the threshold came from, e.g. "fp16: 0.001 + 0.02 * max|torch|"
    # The fp32 reference run's largest |activation| and its module: the fp16 overflow screen's reading.
    peak_activation: float | None = None
    peak_module: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What a TensorRT engine was built for and from: it runs only where all of it still holds."""

    key: str  # the file name's key: sm<cc>-trt<version>-<graph sha256[:12]>-<profile hash>
    compute_capability: str  # "9.0": engines are specific to it
    gpu: str  # the GPU it was built on, e.g. "NVIDIA H100 80GB HBM3" (speed, not compatibility)
    tensorrt: str  # the exact TensorRT version: a plan runs only on the version that built it
    onnx: str  # the graph it was built from, relative to the engine dir
    onnx_sha256: str  # of the graph file and its external data
    profile: dict[str, dict[str, list[int]]]  # input -> {"min", "opt", "max"} shapes
    build_seconds: float = 0.0
    device_memory_bytes: int = 0  # activation memory at the profile's largest shapes


@dataclass(frozen=True)
class Artifact:
    """One file that runs a component: an ONNX graph (fp32 or fp16) or a TensorRT engine built from one."""

    kind: str  # "onnx" or "tensorrt"
    precision: str  # "fp32" or "fp16": what the graph computes in (fp32 in and out either way)
    file: str  # relative to the engine dir
    bytes: int
    external_data: str | None = None  # relative path of the ONNX external-data file, if any
    opset: int | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    validation: Validation | None = None
    engine: EngineInfo | None = None  # tensorrt artifacts only


@dataclass(frozen=True)
class Component:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis]
    artifacts: tuple[Artifact, ...]

    def artifact(self, kind: str = "onnx", precision: str = "fp32") -> Artifact:
        for a in self.artifacts:
            if a.kind == kind and a.precision == precision:
                return a
        raise UserError(f"no {precision} {kind} artifact in this engine dir")

    def graph(self, *preference: str) -> Artifact:
        """The first ONNX graph present in the order of `preference` (e.g. "fp16", "fp32")."""
        for precision in preference:
            for a in self.artifacts:
                if a.kind == "onnx" and a.precision == precision:
                    return a
        raise UserError(f"no {' or '.join(preference)} ONNX graph in this engine dir")

    def engines(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.kind == "tensorrt")


@dataclass(frozen=True)
class LoraRecord:
    file: str
    sha256: str
    format: str
    scale: float
    modules_changed: dict[str, int]


@dataclass(frozen=True)
class Conditioning:
    """How prompts become the UNet's conditioning inputs: the per-family recipe (docs/engine-dir.md).

    Each text encoder in `text_encoders` takes its tokenizer's ids; their first outputs are concatenated on the
    last axis, in this order, into `encoder_hidden_states` [batch, context_length, context_dim].
    """

    text_encoders: tuple[str, ...]
    context_length: int  # tokens per prompt: the sequence length of encoder_hidden_states
    context_dim: int
    pooled: str | None = None  # the text encoder whose `text_embeds` output is the UNet's `text_embeds` input
    time_ids: tuple[str, ...] = ()  # names of the UNet's `time_ids` values, in order (SDXL_TIME_IDS); () = none
    # No negative prompt given (not even ""): the unconditional half is zeros instead of the encoding of "".
    force_zeros_for_empty_prompt: bool = False


@dataclass(frozen=True)
class VaeInfo:
    """How latents map to the VAE's inputs, and what precision the VAE needs."""

    scaling_factor: float  # latents = latent_mean * factor after the encoder; decoder input = latents / factor
    # Optional per-channel statistics (diffusers' latents_mean/latents_std): latents = (mean - m) * factor / s,
    # and the decoder takes latents * s / factor + m.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # The checkpoint's force_upcast: the VAE overflows in fp16, so it runs in fp32 whatever the UNet runs in.
    force_upcast: bool = True
    # The VAE config's sample_size in pixels: the tile side of tiled decode/encode (runtime/vae_tiling.py).
    # None in engine dirs exported before it was recorded.
    sample_size: int | None = None

    def to_latents(self, mean):
        if self.latents_mean is None or self.latents_std is None:
            return mean * self.scaling_factor
        m, s = (_channels(v, mean) for v in (self.latents_mean, self.latents_std))
        return (mean - m) * self.scaling_factor / s

    def from_latents(self, latents):
        if self.latents_mean is None or self.latents_std is None:
            return latents / self.scaling_factor
        m, s = (_channels(v, latents) for v in (self.latents_mean, self.latents_std))
        return latents * s / self.scaling_factor + m


def _channels(values, like):
    import numpy as np

    return np.asarray(values, dtype=like.dtype).reshape(1, -1, 1, 1)


class SettingError(ValueError):
    """A bad generation setting; `setting` names the field, so a CLI can name its own flag instead."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


@dataclass(frozen=True)
class GenerationDefaults:
    """Per-generation settings an engine dir recommends; None leaves the choice to the runtime.

    They come from the checkpoint (its sdrt_defaults.json) or `sdrt export --default-*`. A runtime uses
    them when the caller gives none: sdrt falls back to BUILTIN_DEFAULTS, and to the checkpoint's own
    scheduler (scheduler.json) for `scheduler`.
    """

    guidance_scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None  # an sdrt scheduler name, e.g. "dpmpp-2m-karras"
    # diffusers' guidance_rescale (arXiv 2305.08891 §3.4): 0 is plain classifier-free guidance; v-prediction
    # and zero-terminal-SNR models want about 0.7 at high guidance.
    guidance_rescale: float | None = None

    def __post_init__(self):
        g, n, s, r = self.guidance_scale, self.steps, self.scheduler, self.guidance_rescale
        if g is not None and not _number(g, 0.0, float("inf")):
            raise SettingError("guidance_scale", f"must be a number >= 0, got {g!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise SettingError("steps", f"must be an integer >= 1, got {n!r}")
        if s is not None and (not isinstance(s, str) or not s):
            raise SettingError("scheduler", f"must be a scheduler name, got {s!r}")
        if r is not None and not _number(r, 0.0, 1.0, inclusive=True):
            raise SettingError("guidance_rescale", f"must be a number in [0, 1], got {r!r}")
        for name in ("guidance_scale", "guidance_rescale"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))  # JSON's 3 and 3.0 are one setting

    @classmethod
    def from_flags(cls, flags: dict[str, str], guidance_scale, steps, scheduler,
                   guidance_rescale=None) -> GenerationDefaults:
        """From command-line values; a bad one is a one-line UserError naming its flag (`flags`: setting -> flag)."""
        try:
            return cls(guidance_scale, steps, scheduler, guidance_rescale)
        except SettingError as e:
            raise UserError(f"{flags.get(e.setting, e.setting)} {e.problem}") from None

    def over(self, fallback: GenerationDefaults) -> GenerationDefaults:
        """These settings where set, `fallback`'s elsewhere."""
        return GenerationDefaults(*(mine if mine is not None else theirs
                                    for mine, theirs in zip(astuple(self), astuple(fallback))))

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> GenerationDefaults:
        """From JSON. Strict (a file a person wrote): an unknown key is refused, so a misspelt setting is never
        silently ignored. Not strict (a manifest): a setting a newer sdrt recommends is skipped, not fatal."""
        known = [f.name for f in fields(cls)]
        unknown = set(d) - set(known)
        if unknown and strict:
            raise ValueError(f"unknown setting {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        return cls(**{k: v for k, v in d.items() if k in known})


def _number(x, lo: float, hi: float, inclusive: bool = False) -> bool:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # numpy scalars are Real too
        return False
    return lo <= x <= hi if inclusive else lo <= x < hi


# What sdrt uses when neither the caller nor the engine dir says: guidance 7.5 as diffusers' SD pipelines,
# 30 steps (diffusers says 50; sdrt's default has been 30 since its first release) and no guidance rescale.
BUILTIN_DEFAULTS = GenerationDefaults(guidance_scale=7.5, steps=30, guidance_rescale=0.0)


@dataclass(frozen=True)
class Manifest:
    family: str  # SUPPORTED_FAMILIES
    native_resolution: tuple[int, int]  # (height, width) in pixels
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    vae: VaeInfo
    tokenizers: dict[str, dict]  # per text encoder: {"file", "max_length", "pad_token", "pad_id", "bos_token", ...}
    conditioning: Conditioning
    scheduler: dict  # {"file", "class_name", "prediction_type"} (+ "config_overrides" in migrated v1 dirs)
    components: dict[str, Component]
    # {"path", "fingerprint", "format": "diffusers" | "single-file"} (+ single files' "detected"; "overrides" and
    # "vae" {"path", "fingerprint"} where the export flags replaced what the checkpoint says)
    source: dict
    versions: dict[str, str]
    loras: tuple[LoraRecord, ...] = ()
    defaults: GenerationDefaults = GenerationDefaults()
    # Components an fp16 export left in fp32 (no fp16 graph), with the reason (export/precision.py's policy).
    kept_fp32: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, engine_dir: Path) -> Path:
        """Write manifest.json whole or not at all (a temporary file renamed over it)."""
        path = Path(engine_dir) / MANIFEST_FILE
        partial = path.with_name(f".{MANIFEST_FILE}.partial")
        partial.write_text(self.to_json())
        partial.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise UserError(f"not an sdrt manifest (format {d.get('format')!r})")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise UserError(
                f"manifest format version {d.get('format_version')} is not supported by this sdrt "
                f"(reads {', '.join(map(str, READABLE_VERSIONS))}); re-export the checkpoint with this sdrt"
            )
        if d["format_version"] == 1:
            d = _migrate_v1(d)
        components = {name: _component(c) for name, c in d["components"].items()}
        vae = d["vae"]
        cond = d["conditioning"]
        return cls(
            family=d["family"],
            native_resolution=tuple(d["native_resolution"]),
            latent_channels=d["latent_channels"],
            vae_scale_factor=d["vae_scale_factor"],
            vae=VaeInfo(**{**_known(VaeInfo, vae),
                           **{k: tuple(vae[k]) for k in ("latents_mean", "latents_std") if vae.get(k)}}),
            tokenizers=d["tokenizers"],
            conditioning=Conditioning(**{**cond, "text_encoders": tuple(cond["text_encoders"]),
                                         "time_ids": tuple(cond.get("time_ids", ()))}),
            scheduler=d["scheduler"],
            components=components,
            source=d["source"],
            versions=d["versions"],
            loras=tuple(LoraRecord(**r) for r in d.get("loras", ())),
            defaults=GenerationDefaults.from_dict(d.get("defaults") or {}, strict=False),
            kept_fp32=dict(d.get("kept_fp32") or {}),
            format=d["format"],
            format_version=FORMAT_VERSION,
        )

    @classmethod
    def load(cls, engine_dir: Path) -> Manifest:
        path = Path(engine_dir) / MANIFEST_FILE
        if not Path(engine_dir).is_dir():
            raise UserError(f"engine dir not found: {engine_dir}")
        if not path.is_file():
            raise UserError(f"{engine_dir} is not an sdrt engine dir (no {MANIFEST_FILE})")
        try:
            d = json.loads(path.read_text())
            return cls.from_dict(d)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is corrupt: {e.__class__.__name__}: {e}") from None


# StableDiffusionPipeline.__init__ rewrites every scheduler it is given this way (pipeline_stable_diffusion.py,
# diffusers 0.42.1 l.214-238, "deprecated" configs): the SD pipelines never clip x0 and always offset by 1.
# Version 2 exporters write the rewritten config; version 1 dirs (all SD 1.x) left it to the runtime.
SD_PIPELINE_SCHEDULER_FIXES = {"steps_offset": 1, "clip_sample": False}


def _migrate_v1(d: dict) -> dict:
    """A version 1 dir (SD 1.x: one CLIP text encoder, `tokenizer`, `vae_scaling_factor`) in version 2 terms."""
    d = dict(d)
    tok = d.pop("tokenizer")
    hidden = d["components"][TEXT_ENCODER]["outputs"][0]["shape"][-1]
    d["tokenizers"] = {TEXT_ENCODER: tok}
    d["conditioning"] = dict(text_encoders=[TEXT_ENCODER], context_length=tok["max_length"], context_dim=hidden)
    d["vae"] = dict(scaling_factor=d.pop("vae_scaling_factor"))
    d["scheduler"] = {**d["scheduler"], "config_overrides": SD_PIPELINE_SCHEDULER_FIXES}
    return d


def package_versions(names, missing=None) -> dict:
    """Installed version of each distribution, `missing` where it is not installed (manifest and bench reports)."""
    import importlib.metadata

    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = missing
    return out


def _tensor(d: dict) -> TensorSpec:
    return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


def _known(cls, d: dict) -> dict:
    """The keys of `d` that `cls` has: a field a newer sdrt added is skipped, not fatal."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _artifact(d: dict) -> Artifact:
    v, e = d.get("validation"), d.get("engine")
    return Artifact(**{**_known(Artifact, d), "validation": Validation(**_known(Validation, v)) if v else None,
                       "engine": EngineInfo(**_known(EngineInfo, e)) if e else None})


def _component(d: dict) -> Component:
    return Component(
        inputs=tuple(_tensor(t) for t in d["inputs"]),
        outputs=tuple(_tensor(t) for t in d["outputs"]),
        axes={k: Axis(**a) for k, a in d["axes"].items()},
        artifacts=tuple(_artifact(a) for a in d["artifacts"]),
    )
