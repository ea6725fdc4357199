"""manifest.json: the one contract between the exporter and every runtime (Python, C++ embedders).

The exporter writes it with `Manifest.save`, the runtime reads it with `Manifest.load`; both use the names and
the format version defined here. docs/engine-dir.md documents the same format for embedders.
"""

from __future__ import annotations

import json
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path

from .errors import UserError

FORMAT_NAME = "sdrt-engine-dir"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SCHEDULER_FILE = "scheduler.json"

# Component names, in export order. Their I/O names are part of the contract.
TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER = "text_encoder", "unet", "vae_decoder", "vae_encoder"
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
SUPPORTED_FAMILIES = ("sd1",)


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


@dataclass(frozen=True)
class Artifact:
    """One file that runs a component: an ONNX graph now, fp16 graphs and TensorRT engines later."""

    kind: str  # "onnx" (later "tensorrt")
    precision: str  # "fp32" (later "fp16")
    file: str  # relative to the engine dir
    bytes: int
    external_data: str | None = None  # relative path of the ONNX external-data file, if any
    opset: int | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    validation: Validation | None = None


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


@dataclass(frozen=True)
class LoraRecord:
    file: str
    sha256: str
    format: str
    scale: float
    modules_changed: dict[str, int]


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

    def __post_init__(self):
        g, n, s = self.guidance_scale, self.steps, self.scheduler
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < float("inf")):
            raise SettingError("guidance_scale", f"must be a number >= 0, got {g!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise SettingError("steps", f"must be an integer >= 1, got {n!r}")
        if s is not None and (not isinstance(s, str) or not s):
            raise SettingError("scheduler", f"must be a scheduler name, got {s!r}")
        if g is not None:
            object.__setattr__(self, "guidance_scale", float(g))  # JSON's 3 and 3.0 are one setting

    @classmethod
    def from_flags(cls, flags: dict[str, str], guidance_scale, steps, scheduler) -> GenerationDefaults:
        """From command-line values; a bad one is a one-line UserError naming its flag (`flags`: setting -> flag)."""
        try:
            return cls(guidance_scale, steps, scheduler)
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


# What sdrt uses when neither the caller nor the engine dir says: guidance 7.5 as diffusers' SD pipelines, and
# 30 steps (diffusers says 50; sdrt's default has been 30 since its first release).
BUILTIN_DEFAULTS = GenerationDefaults(guidance_scale=7.5, steps=30)


@dataclass(frozen=True)
class Manifest:
    family: str
    native_resolution: tuple[int, int]  # (height, width) in pixels
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    vae_scaling_factor: float  # latents = vae_encoder_mean * factor; vae_decoder input = latents / factor
    tokenizer: dict  # {"file", "max_length", "pad_token", "bos_token", "eos_token", "pad_id", ...}
    scheduler: dict  # {"file", "class_name", "prediction_type"}
    components: dict[str, Component]
    source: dict  # {"path", "fingerprint", "format"}
    versions: dict[str, str]
    loras: tuple[LoraRecord, ...] = ()
    defaults: GenerationDefaults = GenerationDefaults()
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / MANIFEST_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise UserError(f"not an sdrt manifest (format {d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"manifest format version {d.get('format_version')} is not supported by this sdrt "
                f"(expects {FORMAT_VERSION}); re-export the checkpoint"
            )
        components = {name: _component(c) for name, c in d["components"].items()}
        return cls(
            family=d["family"],
            native_resolution=tuple(d["native_resolution"]),
            latent_channels=d["latent_channels"],
            vae_scale_factor=d["vae_scale_factor"],
            vae_scaling_factor=d["vae_scaling_factor"],
            tokenizer=d["tokenizer"],
            scheduler=d["scheduler"],
            components=components,
            source=d["source"],
            versions=d["versions"],
            loras=tuple(LoraRecord(**r) for r in d.get("loras", ())),
            defaults=GenerationDefaults.from_dict(d.get("defaults") or {}, strict=False),
            format=d["format"],
            format_version=d["format_version"],
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


def _artifact(d: dict) -> Artifact:
    v = d.get("validation")
    return Artifact(**{**d, "validation": Validation(**v) if v else None})


def _component(d: dict) -> Component:
    return Component(
        inputs=tuple(_tensor(t) for t in d["inputs"]),
        outputs=tuple(_tensor(t) for t in d["outputs"]),
        axes={k: Axis(**a) for k, a in d["axes"].items()},
        artifacts=tuple(_artifact(a) for a in d["artifacts"]),
    )
