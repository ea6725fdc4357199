"""`sdrt inspect`: an engine dir's manifest as a readable table."""

from __future__ import annotations

from pathlib import Path

from .manifest import BUILTIN_DEFAULTS, Component, Manifest, TensorSpec

TOP_OPS = 8  # op types listed per artifact
# Listed first: the fused ops that TensorRT and ONNX Runtime turn into single kernels.
FUSED_OPS = ("Attention", "GroupNormalization", "LayerNormalization", "Gelu")


def _shape(t: TensorSpec) -> str:
    return f"{t.name}[{', '.join(str(d) for d in t.shape)}] {t.dtype}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _disk_bytes(engine_dir: Path, files: list[str | None]) -> int | None:
    paths = [Path(engine_dir) / f for f in files if f]
    if not all(p.is_file() for p in paths):
        return None
    return sum(p.stat().st_size for p in paths)


def _component_rows(name: str, c: Component, engine_dir: Path) -> list[str]:
    rows = [f"{name}"]
    rows += [f"  in   {_shape(t)}" for t in c.inputs]
    rows += [f"  out  {_shape(t)}" for t in c.outputs]
    rows.append("  axes " + ", ".join(f"{k} {a.describe()}" for k, a in c.axes.items()))
    for a in c.artifacts:
        on_disk = _disk_bytes(engine_dir, [a.file, a.external_data])
        disk = _size(on_disk) if on_disk is not None else "MISSING"
        v = a.validation
        err = f"max|err| {v.max_abs_error:.2e} vs {v.reference} (threshold {v.threshold:.1e})" if v else "not validated"
        ordered = [op for op in FUSED_OPS if op in a.op_counts] + [op for op in a.op_counts if op not in FUSED_OPS]
        ops = ", ".join(f"{op} {a.op_counts[op]}" for op in ordered[:TOP_OPS])
        if a.engine:
            e = a.engine
            rows.append(f"  {a.kind} {a.precision:<5} {a.file}  {disk}  compute {e.compute_capability} ({e.gpu}), "
                        f"TensorRT {e.tensorrt}, from {e.onnx}, activations {_size(e.device_memory_bytes)}")
            rows += [f"       profile {k} {p['min']}..{p['max']} (opt {p['opt']})" for k, p in e.profile.items()]
            continue
        rows.append(f"  {a.kind} {a.precision:<5} {a.file}  {disk}  opset {a.opset}  {err}")
        if ops:
            total = sum(a.op_counts.values())
            rows.append(f"       {total} nodes: {ops}" + (", ..." if len(a.op_counts) > TOP_OPS else ""))
    return rows


def describe_defaults(m: Manifest) -> str:
    """What a generation that sets nothing uses, and where each value comes from."""
    d, b = m.defaults, BUILTIN_DEFAULTS
    guidance = f"{d.guidance_scale:g}" if d.guidance_scale is not None else f"{b.guidance_scale:g} (sdrt's)"
    steps = f"{d.steps}" if d.steps is not None else f"{b.steps} (sdrt's)"
    scheduler = d.scheduler or f"the checkpoint's {m.scheduler['class_name']}"
    rescale = f"{d.guidance_rescale:g}" if d.guidance_rescale is not None else f"{b.guidance_rescale:g} (sdrt's)"
    return f"guidance {guidance}   steps {steps}   scheduler {scheduler}   guidance rescale {rescale}"


def describe_conditioning(m: Manifest) -> str:
    c = m.conditioning
    parts = [" + ".join(c.text_encoders) + f" -> [{c.context_length}, {c.context_dim}]"]
    if c.pooled:
        parts.append(f"text_embeds from {c.pooled}")
    if c.time_ids:
        parts.append(f"time_ids ({len(c.time_ids)})")
    if c.force_zeros_for_empty_prompt:
        parts.append("zeros for no negative prompt")
    return ", ".join(parts)


def describe_source(source: dict) -> list[str]:
    """Where the weights came from (a single file's sha256 in full), what was detected in it and overridden."""
    kind = "single file" if source.get("format") == "single-file" else source.get("format", "diffusers")
    rows = [f"source       {kind} {source.get('path')}", f"             {source.get('fingerprint', '')}"]
    if d := source.get("detected"):
        ema = ", EMA weights" if d.get("ema") else ""
        rows.append(f"detected     {d.get('family')}, {'/'.join(d.get('dtypes', []))}{ema}, "
                    f"{d.get('prediction_type')} ({d.get('prediction_type_from')}), native {d.get('native_size')} px "
                    f"({d.get('native_size_from')}), VAE {d.get('vae')}")
        if unused := d.get("unused_tensors"):
            rows[-1] += (f", {sum(unused.values())} tensors unused ("
                         + ", ".join(f"{group}.* {n}" for group, n in unused.items()) + ")")
    if o := source.get("overrides"):
        rows.append("overrides    " + "   ".join(f"{k} {v}" for k, v in o.items()))
    return rows


def render(m: Manifest, engine_dir: Path) -> str:
    h, w = m.native_resolution
    lines = [
        f"engine dir   {engine_dir}",
        f"family       {m.family}   native {w}x{h}   latent {m.latent_channels}ch /{m.vae_scale_factor}   "
        f"vae scaling {m.vae.scaling_factor:g}" + ("   vae force_upcast" if m.vae.force_upcast else ""),
        f"conditioning {describe_conditioning(m)}",
        *(f"tokenizer    {name}: {t['file']}  max_length {t['max_length']}  pad {t['pad_token']!r}"
          for name, t in m.tokenizers.items()),
        f"scheduler    {m.scheduler['class_name']} ({m.scheduler['prediction_type']})",
        f"defaults     {describe_defaults(m)}",
        *describe_source(m.source),
        "versions     " + "  ".join(f"{k} {v}" for k, v in m.versions.items()),
    ]
    for lora in m.loras:
        lines.append(f"lora         {lora.file} x{lora.scale} ({lora.format}) {lora.modules_changed}")
    for name, why in m.kept_fp32.items():
        lines.append(f"kept fp32    {name}: {why}")
    lines.append("")
    for name, c in m.components.items():
        lines += _component_rows(name, c, engine_dir)
    return "\n".join(lines) + "\n"
