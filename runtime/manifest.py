"""manifest.json: the one contract between the exporter and every runtime (Python, C++ embedders).

The exporter writes it with `Manifest.save`, the runtime reads it with `Manifest.load`; both use the names and
the format version defined here. docs/engine-dir.md documents the same format for embedders.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is corrupt: {e.__class__.__name__}: {e}") from None


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
