"""TensorRT engine bookkeeping, without TensorRT: optimization profiles from the manifest's axes, engine keys and
file names, and which engine of a component can run a call here.

An engine is specific to a GPU compute capability, a TensorRT version, the graph it was built from and its
optimization profile; its key names all four, so engines for several GPUs or profiles sit side by side in a
component's folder (`unet/engine-sm90-trt11.4.0.106-3f2a9c1b7d4e-a1b2c3d4.plan`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .manifest import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER, Artifact, Component, Manifest

# Rows per image in each component's batch: the UNet sees the unconditional and conditional halves together.
ROWS_PER_IMAGE = {TEXT_ENCODER: 1, TEXT_ENCODER_2: 1, UNET: 2, VAE_DECODER: 1, VAE_ENCODER: 1}
DEFAULT_MAX_BATCH = 4  # images per call a default (dynamic) profile takes: activation memory grows with it
SPATIAL = {"latent_height": ("h", "latent"), "latent_width": ("w", "latent"),
           "image_height": ("h", "pixels"), "image_width": ("w", "pixels")}


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """'768x512' -> (768, 512) as height x width; a single number is square."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"{flag} {text!r} is not a size: give HEIGHTxWIDTH in pixels, e.g. 512x768")
    return parts[0], parts[1]


@dataclass(frozen=True)
class BuildShapes:
    """The image sizes and batch an engine must take, in pixels and images (not latent cells or rows)."""

    min_size: tuple[int, int]
    opt_size: tuple[int, int]
    max_size: tuple[int, int]
    batch: int = 1  # images per call the profile is tuned for (static: the only one)
    max_batch: int = DEFAULT_MAX_BATCH
    static: bool = False

    @classmethod
    def default(cls, manifest: Manifest) -> BuildShapes:
        """Every size the engine dir's UNet takes, tuned for the native one; 1 to 4 images."""
        ax, f = manifest.components[UNET].axes, manifest.vae_scale_factor
        lo = (ax["latent_height"].min * f, ax["latent_width"].min * f)
        hi = (ax["latent_height"].max * f, ax["latent_width"].max * f)
        return cls(lo, tuple(manifest.native_resolution), hi)

    @classmethod
    def from_flags(cls, manifest: Manifest, static: str | None = None, batch: int | None = None,
                   min_size: str | None = None, opt_size: str | None = None, max_size: str | None = None,
                   max_batch: int | None = None) -> BuildShapes:
        """`sdrt build`'s flags: --static HxW [--batch N], or any of --min/--opt/--max HxW, --batch, --max-batch."""
        if batch is not None and batch < 1:
            raise UserError(f"--batch must be at least 1, got {batch}")
        if max_batch is not None and max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {max_batch}")
        if static is not None:
            if min_size or opt_size or max_size or max_batch:
                raise UserError("--static fixes the size and batch: it cannot be combined with --min, --opt, --max "
                                "or --max-batch")
            size, n = parse_size(static, "--static"), batch or 1
            shapes = cls(size, size, size, n, n, static=True)
        else:
            d = cls.default(manifest)
            n = batch or d.batch
            shapes = cls(parse_size(min_size, "--min") if min_size else d.min_size,
                         parse_size(opt_size, "--opt") if opt_size else d.opt_size,
                         parse_size(max_size, "--max") if max_size else d.max_size,
                         n, max_batch or max(n, d.max_batch))
        shapes.check(manifest)
        return shapes

    def check(self, manifest: Manifest) -> None:
        """Refuse sizes out of order, off the grid or outside what the engine dir's graphs take."""
        ax, f = manifest.components[UNET].axes, manifest.vae_scale_factor
        flags = ("--static",) * 3 if self.static else ("--min", "--opt", "--max")
        for flag, (h, w) in zip(flags, (self.min_size, self.opt_size, self.max_size)):
            for label, px, axis in (("height", h, ax["latent_height"]), ("width", w, ax["latent_width"])):
                if px % f or not axis.check(px // f):
                    raise UserError(f"{flag} {label} {px} is outside the engine dir's range: {axis.min * f}..{axis.max * f} "
                                    f"in steps of {axis.multiple_of * f}")
        for i, label in enumerate(("height", "width")):
            if not self.min_size[i] <= self.opt_size[i] <= self.max_size[i]:
                raise UserError(f"the {label}s must satisfy --min <= --opt <= --max, got "
                                f"{self.min_size[i]}, {self.opt_size[i]}, {self.max_size[i]}")
        if self.batch > self.max_batch:
            raise UserError(f"--batch {self.batch} exceeds --max-batch {self.max_batch}")

    def profile(self, name: str, component: Component, vae_factor: int) -> dict[str, dict[str, list[int]]]:
        """min/opt/max shapes of each input of one component, clamped to its manifest axes."""
        rows = ROWS_PER_IMAGE.get(name, 1)
        values: dict[str, tuple[int, int, int]] = {}
        for axis_name, axis in component.axes.items():
            if axis_name == "batch":
                lo = self.batch * rows if self.static else 1
                v = (lo, self.batch * rows, self.max_batch * rows)
            elif axis_name in SPATIAL:
                i = 0 if SPATIAL[axis_name][0] == "h" else 1
                scale = 1 if SPATIAL[axis_name][1] == "pixels" else vae_factor
                v = tuple(s[i] // scale for s in (self.min_size, self.opt_size, self.max_size))
            else:
                v = (axis.min, axis.opt, axis.max)
            if not (axis.check(v[0]) and axis.check(v[2])):
                raise UserError(f"{name}: {axis_name} {v[0]}..{v[2]} is outside the engine dir's range "
                                f"{axis.describe()}")
            values[axis_name] = v
        out = {}
        for t in component.inputs:
            dims = [(d, d, d) if isinstance(d, int) else values[d] for d in t.shape]
            out[t.name] = {k: [d[i] for d in dims] for i, k in enumerate(("min", "opt", "max"))}
        return out

    def describe(self) -> str:
        if self.static:
            return f"static {self.opt_size[0]}x{self.opt_size[1]}, {self.batch} image(s)"
        return (f"{self.min_size[0]}x{self.min_size[1]}..{self.max_size[0]}x{self.max_size[1]} "
                f"(tuned for {self.opt_size[0]}x{self.opt_size[1]}), 1..{self.max_batch} image(s)")


def file_sha256(*paths: Path) -> str:
    """One sha256 over the files in order (a graph and its external data)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def graph_sha256(engine_dir: Path, graph: Artifact) -> str:
    paths = [Path(engine_dir) / graph.file]
    if graph.external_data:
        paths.append(Path(engine_dir) / graph.external_data)
    return file_sha256(*paths)


def engine_key(compute_capability: str, tensorrt: str, onnx_sha256: str, profile: dict, settings: dict) -> str:
    """sm<cc>-trt<version>-<graph sha256[:12]>-<hash of the profile and builder settings>."""
    blob = json.dumps({"profile": profile, "settings": settings}, sort_keys=True).encode()
    return (f"sm{compute_capability.replace('.', '')}-trt{tensorrt}-{onnx_sha256[:12]}-"
            f"{hashlib.sha256(blob).hexdigest()[:8]}")


def engine_file(component: str, key: str) -> str:
    return f"{component}/engine-{key}.plan"


def covers(profile: dict[str, dict[str, list[int]]], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None if every input shape lies inside the profile, else a line naming the first input that does not."""
    for name, shape in shapes.items():
        p = profile.get(name)
        if p is None:
            continue
        lo, hi = p["min"], p["max"]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return f"{name}: shape {list(shape)} is outside the TensorRT profile {lo}..{hi}"
    return None


def matching_engines(component: Component, compute_capability: str, tensorrt: str) -> tuple[Artifact, ...]:
    return tuple(a for a in component.engines()
                 if a.engine and a.engine.compute_capability == compute_capability and a.engine.tensorrt == tensorrt)


def mismatch(name: str, component: Component, compute_capability: str, tensorrt: str, gpu: str) -> str:
    """The line for a component whose engines were all built elsewhere (or which has none)."""
    built = sorted({(a.engine.compute_capability, a.engine.tensorrt, a.engine.gpu) for a in component.engines()
                    if a.engine})
    here = f"compute {compute_capability} ({gpu}) with TensorRT {tensorrt}"
    if not built:
        return f"{name} has no TensorRT engine: build one here with `sdrt build ENGINE_DIR`"
    there = "; ".join(f"compute {cc} ({g}) with TensorRT {v}" for cc, v, g in built)
    return (f"{name}: its TensorRT engines were built for {there}; this machine has {here}. "
            f"Rebuild them here with `sdrt build ENGINE_DIR`")
