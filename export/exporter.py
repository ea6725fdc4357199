"""`sdrt export`: checkpoint (folder or single file) -> validated engine dir, written atomically.

Every component takes the same path: wrap -> trace to ONNX -> validate in ONNX Runtime -> manifest entry.
The dir is built in a temporary sibling and renamed into place at the end, so a failed or interrupted
export (Ctrl-C included) leaves neither the engine dir nor the temporary folder behind.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import (UNET, Artifact, Component, Conditioning, GenerationDefaults, Manifest, VaeInfo,
                                   package_versions)

from . import assets
from .checkpoint import Checkpoint, SourceOptions, check_defaults, load_modules, open_checkpoint
from .families import ExportFamily
from .lora_merge import LoraSpec, merge_loras
from .onnx_export import OPSET, OnnxFile, export_onnx
from .precision import PRECISIONS, attention_in_fp32, half_modules, policy_fp32, upcast_attention
from .specs import Geometry, TextEncoderGeometry, build_specs
from .validate import check_onnx, reference_outputs

ONNX_FILE = "model.onnx"
ONNX_FILES = {"fp32": ONNX_FILE, "fp16": "model.fp16.onnx"}
VERSIONED = ("sdrt", "torch", "onnx", "onnxscript", "onnxruntime", "diffusers", "transformers")  # in the manifest
SEED = 0


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: str
    out: Path
    overwrite: bool = False
    components: tuple[str, ...] | None = None  # None: all of the family's
    loras: tuple[LoraSpec, ...] = ()  # merged in order before tracing
    lora_allow_partial: bool = False
    defaults: GenerationDefaults = GenerationDefaults()  # recommended settings; set ones override the checkpoint's
    source: SourceOptions = SourceOptions()  # --vae, --prediction-type, --native-size, --tokenizer, --no-ema
    precisions: tuple[str, ...] = ("fp32",)  # graphs to write: "fp32", "fp16" (precision.py's policy)

    def __post_init__(self):
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise UserError(f"unknown precision {', '.join(unknown) or '(none given)'} "
                            f"(choose from: {', '.join(PRECISIONS)})")
        object.__setattr__(self, "precisions", tuple(p for p in PRECISIONS if p in self.precisions))


def _seq_len(tokenizer, text_encoder) -> int:
    """Tokens per prompt: the tokenizer's model_max_length (Taiyi: 512), which the encoder must be able to take."""
    n = int(tokenizer.model_max_length)
    positions = int(getattr(text_encoder.config, "max_position_embeddings", n))
    if n > positions:
        raise UserError(f"tokenizer model_max_length {n} exceeds the text encoder's {positions} positions")
    return n


def geometry(family: ExportFamily, modules: dict) -> Geometry:
    unet, vae = modules["unet"], modules["vae"]
    encoders = []
    for role in family.text_encoders:
        te = modules[role.component]
        encoders.append(TextEncoderGeometry(
            name=role.component, seq_len=_seq_len(modules[role.tokenizer], te), hidden=int(te.config.hidden_size),
            vocab_size=int(te.config.vocab_size), output=role.output, penultimate=role.penultimate,
            pooled_dim=int(te.config.projection_dim) if role.pooled else None))
    lengths = {t.seq_len for t in encoders}
    if len(lengths) != 1:
        raise UserError(f"the tokenizers disagree on the prompt length: {sorted(lengths)}")
    n_down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
    geo = Geometry(
        text_encoders=tuple(encoders),
        latent_channels=int(unet.config.in_channels),
        vae_factor=2 ** (len(vae.config.block_out_channels) - 1),
        unet_multiple=2**n_down,
        native_latent=int(unet.config.sample_size),
        time_ids=len(family.time_ids),
    )
    if int(unet.config.cross_attention_dim) != geo.context_dim:
        raise UserError(f"the UNet attends to {unet.config.cross_attention_dim}-wide text states but the text "
                        f"encoders give {geo.context_dim}")
    if family.time_ids:
        expected = int(unet.add_embedding.linear_1.in_features)
        given = int(unet.config.addition_time_embed_dim) * len(family.time_ids) + geo.pooled_dim
        if expected != given:  # diffusers' _get_add_time_ids check: e.g. a refiner's aesthetic-score UNet
            raise UserError(f"the UNet's added conditioning takes {expected} values, {family.name} gives {given}")
    return geo


def with_native_size(geo: Geometry, pixels: int | None) -> Geometry:
    """--native-size: the resolution the engine dir is built around, a multiple of what the UNet can divide."""
    if pixels is None:
        return geo
    multiple = geo.vae_factor * geo.unet_multiple
    if pixels % multiple:
        raise UserError(f"--native-size {pixels} is not a multiple of {multiple} (VAE factor x UNet downsampling)")
    return replace(geo, native_latent=pixels // geo.vae_factor)


def describe_source(ckpt: Checkpoint) -> str:
    """One progress line on how a single file was read: what was detected and what was assumed."""
    d = ckpt.single_file.detected
    ema = ", EMA weights" if d["ema"] else ""
    return (f"single file: {d['family']}, {d['tensors']} tensors ({'/'.join(d['dtypes'])}){ema}; "
            f"{d['prediction_type']} from {d['prediction_type_from']}; native {d['native_size']} px from "
            f"{d['native_size_from']}; VAE {d['vae']}")


def conditioning(ckpt: Checkpoint, geo: Geometry) -> Conditioning:
    family = ckpt.spec
    pooled = next((r.component for r in family.text_encoders if r.pooled), None)
    return Conditioning(text_encoders=tuple(r.component for r in family.text_encoders),
                        context_length=geo.context_length, context_dim=geo.context_dim, pooled=pooled,
                        time_ids=family.time_ids, force_zeros_for_empty_prompt=family.force_zeros(ckpt.model_index))


def vae_info(vae) -> VaeInfo:
    c = vae.config
    mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
    # diffusers' tile side (AutoencoderKL.tile_sample_min_size); a [h, w] sample_size tiles by its first value.
    size = getattr(c, "sample_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return VaeInfo(scaling_factor=float(c.scaling_factor),
                   latents_mean=tuple(map(float, mean)) if mean is not None else None,
                   latents_std=tuple(map(float, std)) if std is not None else None,
                   force_upcast=bool(getattr(c, "force_upcast", True)),
                   sample_size=int(size) if size else None)


def release(modules: dict, specs: dict, remaining: tuple[str, ...]) -> None:
    """Drop the torch modules no remaining component uses: a full-size SDXL export fits in 24 GB only so."""
    needed = {m for name in remaining for m in specs[name].uses}
    for name in [n for n in modules if isinstance(modules[n], torch.nn.Module) and n not in needed]:
        del modules[name]
    gc.collect()


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
    ckpt = open_checkpoint(opts.checkpoint, opts.source)
    defaults = opts.defaults.over(ckpt.defaults).over(ckpt.spec.defaults)
    components = ckpt.spec.components if opts.components is None else tuple(opts.components)
    unknown = [c for c in components if c not in ckpt.spec.components]
    if unknown:
        raise UserError(f"a {ckpt.family} checkpoint has no component {', '.join(unknown)} "
                        f"(its components: {', '.join(ckpt.spec.components)})")
    modules = load_modules(ckpt)
    # LoRA problems are user errors too: reported alone, before any progress line.
    lora_lines: list[str] = []
    loras = merge_loras(opts.loras, modules, opts.lora_allow_partial, lora_lines.append)
    log(f"sdrt export: {ckpt.path} ({ckpt.family}) -> {out}")
    if ckpt.single_file is not None:
        log(describe_source(ckpt))
    recommended = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in asdict(defaults).items() if v is not None)
    if recommended:
        log(f"recommended settings: {recommended}")
    if ckpt.single_file is not None and (unused := ckpt.single_file.file.unused()):
        log(f"single file: {sum(unused.values())} tensors not used by the export: "
            + ", ".join(f"{group}.* ({n})" for group, n in unused.items()))
    for line in lora_lines:
        log(line)
    geo = with_native_size(geometry(ckpt.spec, modules), opts.source.native_size)
    fixes = dict(ckpt.spec.scheduler_fixes)
    if opts.source.prediction_type:
        fixes["prediction_type"] = opts.source.prediction_type
    specs = build_specs(geo)
    vae = vae_info(modules["vae"])
    gen = torch.Generator().manual_seed(SEED)
    done = {}
    with staging_dir(out, opts.overwrite) as tmp:
        tokenizers = {t.name: assets.write_tokenizer(modules[role.tokenizer], t.seq_len, tmp,
                                                     assets.tokenizer_file(t.name))
                      for t, role in zip(geo.text_encoders, ckpt.spec.text_encoders)}
        scheduler = assets.write_scheduler(modules["scheduler"], tmp, fixes)
        release(modules, specs, components)
        keep_fp32 = policy_fp32(ckpt.family, modules) if "fp16" in opts.precisions else {}
        kept: dict[str, str] = {}
        for i, name in enumerate(components, 1):
            spec, t = specs[name], time.perf_counter()
            (tmp / name).mkdir()
            module = spec.wrapper(modules).eval()
            ref = reference_outputs(spec, module, gen)
            precisions = opts.precisions
            if "fp16" in precisions:
                reason = keep_fp32.get(name)
                if reason is None and ref.peak.overflows_fp16:
                    reason = (f"its fp32 activations exceed fp16's 65504 from {ref.peak.first_overflow} on "
                              f"(peak {ref.peak.value:.3g} in {ref.peak.module})")
                if reason is not None:
                    kept[name] = reason
                    precisions = ("fp32",)
                    log(f"[{i}/{len(components)}] {name}: stays fp32 in the fp16 export: {reason}")
            files: dict[str, OnnxFile] = {}
            if "fp32" in precisions:
                files["fp32"] = export_onnx(spec, module, tmp / name / ONNX_FILES["fp32"], gen)
            del module
            if "fp16" in precisions:
                needed_later = {m for later in components[i:] for m in specs[later].uses}
                half = spec.wrapper(half_modules(modules, spec.uses, needed_later)).eval()
                with attention_in_fp32(upcast_attention(name, modules)):
                    files["fp16"] = export_onnx(spec, half, tmp / name / ONNX_FILES["fp16"], gen)
                del half
            release(modules, specs, components[i:])
            for onnx_file in files.values():
                if name == UNET and onnx_file.op_counts.get("Attention", 0) == 0:
                    raise UserError("unet: the ONNX graph has no Attention nodes; the export failed to fuse attention")
            artifacts = []
            for precision, onnx_file in files.items():
                validation = check_onnx(spec, onnx_file.path, ref, precision)
                artifacts.append(Artifact(kind="onnx", precision=precision, file=_relative(onnx_file.path, tmp),
                                          bytes=onnx_file.bytes, external_data=_relative(onnx_file.external_data, tmp),
                                          opset=OPSET, op_counts=onnx_file.op_counts, validation=validation))
            done[name] = Component(inputs=spec.inputs, outputs=spec.outputs, axes=spec.axes,
                                   artifacts=tuple(artifacts))
            checks = ", ".join(f"{a.precision} max|onnx - torch| {a.validation.max_abs_error:.2e} "
                               f"(threshold {a.validation.threshold:.1e})" for a in artifacts)
            log(f"[{i}/{len(components)}] {name}: {time.perf_counter() - t:.1f} s, "
                f"{sum(f.bytes for f in files.values()) / 2**20:.1f} MiB, {checks}")
            del ref
        native = geo.native_latent * geo.vae_factor
        manifest = Manifest(
            family=ckpt.family,
            native_resolution=(native, native),
            latent_channels=geo.latent_channels,
            vae_scale_factor=geo.vae_factor,
            vae=vae,
            tokenizers=tokenizers,
            conditioning=conditioning(ckpt, geo),
            scheduler=scheduler,
            components=done,
            source=ckpt.source(),
            versions=package_versions(VERSIONED, missing="unknown"),
            loras=loras,
            defaults=defaults,
            kept_fp32=kept,
        )
        manifest.save(tmp)
    log(f"sdrt export: wrote {out} in {time.perf_counter() - t0:.1f} s")
    return manifest
