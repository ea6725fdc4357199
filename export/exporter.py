"""`sdrt export`: checkpoint folder -> validated engine dir, written atomically.

Every component takes the same path: wrap -> trace to ONNX -> validate in ONNX Runtime -> manifest entry.
The dir is built in a temporary sibling and renamed into place at the end, so a failed or interrupted
export (Ctrl-C included) leaves neither the engine dir nor the temporary folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import COMPONENTS, Artifact, Component, GenerationDefaults, Manifest, package_versions

from . import assets
from .checkpoint import check_defaults, fingerprint, load_modules, open_checkpoint
from .lora_merge import LoraSpec, merge_loras
from .onnx_export import OPSET, export_onnx
from .specs import Geometry, build_specs
from .validate import validate_onnx

ONNX_FILE = "model.onnx"
VERSIONED = ("sdrt", "torch", "onnx", "onnxscript", "onnxruntime", "diffusers", "transformers")  # in the manifest
SEED = 0


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: str
    out: Path
    overwrite: bool = False
    components: tuple[str, ...] = COMPONENTS
    loras: tuple[LoraSpec, ...] = ()  # merged in order before tracing
    lora_allow_partial: bool = False
    defaults: GenerationDefaults = GenerationDefaults()  # recommended settings; set ones override the checkpoint's


def geometry(modules: dict) -> Geometry:
    unet, vae, te, tok = modules["unet"], modules["vae"], modules["text_encoder"], modules["tokenizer"]
    n_down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
    return Geometry(
        seq_len=int(tok.model_max_length),
        text_hidden=int(te.config.hidden_size),
        vocab_size=int(te.config.vocab_size),
        latent_channels=int(unet.config.in_channels),
        vae_factor=2 ** (len(vae.config.block_out_channels) - 1),
        unet_multiple=2**n_down,
        native_latent=int(unet.config.sample_size),
    )


def _relative(path: Path | None, root: Path) -> str | None:
    return path.relative_to(root).as_posix() if path else None


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"parent folder of {out} does not exist")


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` if the block completes, removed otherwise."""
    check_out(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the engine dir gets the usual permissions
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export(opts: ExportOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Manifest:
    """Export the checkpoint to `opts.out`; returns the manifest written there."""
    out = Path(opts.out)
    check_out(out, opts.overwrite)  # before the slow part; checked again when the staging dir is made
    check_defaults(opts.defaults, "default settings")
    t0 = time.perf_counter()
    ckpt = open_checkpoint(opts.checkpoint)
    defaults = opts.defaults.over(ckpt.defaults)
    modules = load_modules(ckpt)
    # LoRA problems are user errors too: reported alone, before any progress line.
    lora_lines: list[str] = []
    loras = merge_loras(opts.loras, modules, opts.lora_allow_partial, lora_lines.append)
    log(f"sdrt export: {ckpt.path} ({ckpt.family}) -> {out}")
    recommended = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in asdict(defaults).items() if v is not None)
    if recommended:
        log(f"recommended settings: {recommended}")
    for line in lora_lines:
        log(line)
    geo = geometry(modules)
    specs = build_specs(geo)
    gen = torch.Generator().manual_seed(SEED)
    components = {}
    with staging_dir(out, opts.overwrite) as tmp:
        tokenizer = assets.write_tokenizer(modules["tokenizer"], tmp)
        scheduler = assets.write_scheduler(modules["scheduler"], tmp)
        for i, name in enumerate(opts.components, 1):
            spec, t = specs[name], time.perf_counter()
            (tmp / name).mkdir()
            module = spec.wrapper(modules).eval()
            onnx_file = export_onnx(spec, module, tmp / name / ONNX_FILE, gen)
            if name == "unet" and onnx_file.op_counts.get("Attention", 0) == 0:
                raise UserError("unet: the ONNX graph has no Attention nodes; the export failed to fuse attention")
            validation = validate_onnx(spec, module, onnx_file.path, gen)
            artifact = Artifact(kind="onnx", precision="fp32", file=_relative(onnx_file.path, tmp),
                                bytes=onnx_file.bytes, external_data=_relative(onnx_file.external_data, tmp),
                                opset=OPSET, op_counts=onnx_file.op_counts, validation=validation)
            components[name] = Component(inputs=spec.inputs, outputs=spec.outputs, axes=spec.axes,
                                         artifacts=(artifact,))
            log(f"[{i}/{len(opts.components)}] {name}: {time.perf_counter() - t:.1f} s, "
                f"{onnx_file.bytes / 2**20:.1f} MiB, max|onnx - torch| {validation.max_abs_error:.2e} "
                f"(threshold {validation.threshold:.1e})")
        native = geo.native_latent * geo.vae_factor
        manifest = Manifest(
            family=ckpt.family,
            native_resolution=(native, native),
            latent_channels=geo.latent_channels,
            vae_scale_factor=geo.vae_factor,
            vae_scaling_factor=float(modules["vae"].config.scaling_factor),
            tokenizer=tokenizer,
            scheduler=scheduler,
            components=components,
            source=dict(path=str(ckpt.path.resolve()), format="diffusers", fingerprint=fingerprint(ckpt.path)),
            versions=package_versions(VERSIONED, missing="unknown"),
            loras=loras,
            defaults=defaults,
        )
        manifest.save(tmp)
    log(f"sdrt export: wrote {out} in {time.perf_counter() - t0:.1f} s")
    return manifest
