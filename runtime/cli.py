"""`sdrt` command line: parse, then call one library function.

`sdrt export` imports the torch-side exporter only when it runs, so every other subcommand starts without
torch. User errors print one line and exit with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .backend import BACKENDS
from .errors import UserError
from .manifest import BUILTIN_DEFAULTS, COMPONENTS, GenerationDefaults
from .schedulers import SCHEDULER_NAMES
from .schedulers.parameterization import PREDICTION_TYPES
from .serve import cli as serve_cli

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except None: those flags' help says what leaving them out means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (argparse prints the whole usage block by default)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a Stable Diffusion checkpoint to an engine dir",
        description="Trace an SD 1.x, SD 2.x, SDXL or Taiyi checkpoint, a diffusers folder or a single "
        ".safetensors/.ckpt file (the family and sizes are detected from the weights, offline), "
        "to ONNX (opset 23, fused Attention), validate "
        "every graph against torch in ONNX Runtime, and write an engine dir with manifest.json. The dir "
        "appears only when the export succeeds.",
        formatter_class=_Formatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="diffusers checkpoint folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/, "
                   "scheduler/; SDXL also text_encoder_2/, tokenizer_2/), a single-file checkpoint in the original "
                   "LDM/A1111 layout (.safetensors, or a .ckpt read weights-only), or 'demo' for the model shipped "
                   "with sdrt")
    p.add_argument("--out", required=True, type=Path, metavar="ENGINE_DIR", help="engine dir to create")
    p.add_argument("--overwrite", action="store_true", help="replace ENGINE_DIR if it exists")
    p.add_argument("--precision", nargs="+", choices=("fp32", "fp16"), default=["fp32"], metavar="P",
                   help="graphs to write, one or more of fp32, fp16. fp16 graphs (for the cuda and tensorrt "
                   "backends) sit beside the fp32 ones, each validated against torch fp32; parts that overflow "
                   "fp16 stay fp32 (the SDXL VAE; attention of UNets that ask for upcast_attention), see "
                   "docs/engine-dir.md")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=None, metavar="NAME",
                   help=f"components to export, from: {', '.join(COMPONENTS)} (text_encoder_2: SDXL only); "
                   "default: all of the checkpoint's")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge this LoRA (kohya/A1111, diffusers attn-procs, diffusers or PEFT; .safetensors or "
                   ".bin) into the weights before export, at SCALE (default 1.0); repeat to merge several, in order")
    p.add_argument("--lora-allow-partial", action="store_true",
                   help="merge a LoRA even if some of its keys match no module of the checkpoint")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="replace the checkpoint's VAE with this one: a single file (LDM or diffusers names) or a "
                   "diffusers VAE folder; it keeps the checkpoint's latent scaling factor unless it is a folder "
                   "with its own config")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the UNet predicts, where the checkpoint says it wrongly or not at all; default: the "
                   "scheduler config of a folder; for single files the family's (SD 2.x: v_prediction, or "
                   "epsilon for the 512-base release's global_step)")
    p.add_argument("--native-size", type=int, default=None, metavar="PX",
                   help="the resolution the model was trained at (the engine dir's native size, its axes span "
                   "half to twice it); default: the UNet config's sample_size, for single files the family's "
                   "(SD 1.x/Taiyi 512, SD 2.x 768 for v-prediction else 512, SDXL 1024)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="single files: a tokenizer folder (transformers layout) instead of the CLIP vocabulary "
                   "that ships with sdrt; required for Taiyi files (its vocab.txt)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="single files that carry both: use the training UNet weights instead of the EMA copy")
    p.add_argument("--default-guidance", type=float, default=None, metavar="G",
                   help="recommended guidance scale, recorded in the engine dir and used when a generation gives "
                   "none; default: the checkpoint's sdrt_defaults.json, else none (sdrt then uses "
                   f"{BUILTIN_DEFAULTS.guidance_scale})")
    p.add_argument("--default-steps", type=int, default=None, metavar="N",
                   help="recommended denoising steps, recorded likewise; default: the checkpoint's "
                   f"sdrt_defaults.json, else none (sdrt then uses {BUILTIN_DEFAULTS.steps})")
    p.add_argument("--default-scheduler", choices=SCHEDULER_NAMES, default=None, metavar="NAME",
                   help="recommended scheduler, recorded likewise; default: the checkpoint's sdrt_defaults.json, "
                   f"else none (sdrt then uses the checkpoint's own); one of: {', '.join(SCHEDULER_NAMES)}")
    p.add_argument("--default-guidance-rescale", type=float, default=None, metavar="PHI",
                   help="recommended guidance rescale in [0, 1] (v-prediction and zero-terminal-SNR models want "
                   "about 0.7), recorded likewise; default: the checkpoint's sdrt_defaults.json, else none (sdrt "
                   f"then uses {BUILTIN_DEFAULTS.guidance_rescale:g})")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    try:
        from sdrt.export.checkpoint import SourceOptions
        from sdrt.export.exporter import ExportOptions, export
        from sdrt.export.lora_merge import LoraSpec
    except ImportError as e:
        raise UserError(f"sdrt export needs the export extra ({e.name} is missing): pip install 'sdrt[export]'")
    defaults = GenerationDefaults.from_flags(
        {"guidance_scale": "--default-guidance", "steps": "--default-steps",
         "guidance_rescale": "--default-guidance-rescale"},
        args.default_guidance, args.default_steps, args.default_scheduler, args.default_guidance_rescale)
    source = SourceOptions(vae=args.vae, prediction_type=args.prediction_type, native_size=args.native_size,
                           tokenizer=args.tokenizer, ema=args.ema)
    export(ExportOptions(checkpoint=args.checkpoint, out=args.out, overwrite=args.overwrite,
                         components=tuple(args.components) if args.components else None,
                         loras=tuple(LoraSpec.parse(a) for a in args.lora),
                         lora_allow_partial=args.lora_allow_partial, defaults=defaults, source=source,
                         precisions=tuple(args.precision)))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="print an engine dir's manifest as a table",
        description="Show the components of an engine dir: I/O shapes, axis ranges, files, sizes on disk, "
        "op counts and validation errors.",
        formatter_class=_Formatter,
    )
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine dir written by sdrt export")
    p.add_argument("--json", action="store_true", help="print the raw manifest.json instead of the table")
    p.set_defaults(run=_run_inspect)


def _add_cpu_precision(p) -> None:
    from .backend_openvino import PRECISIONS

    p.add_argument("--cpu-precision", choices=PRECISIONS, default="auto",
                   help="openvino backend: bf16 (bfloat16 matrix products; needs avx512_bf16 or AMX; SD 1.5 at 512x512 "
                   "ran 4.3x diffusers fp32 on an AMX CPU), f32, or auto: bf16 where the CPU has it, else f32. ONNX "
                   "Runtime (cpu) computes in f32")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images from an engine dir",
        description="Text-to-image, or image-to-image with --init-image. Writes PNGs with the generation "
        "parameters in a text chunk named 'parameters' (A1111 format).",
        formatter_class=_Formatter,
    )
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine dir written by sdrt export")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps; default: the engine dir's recommended (sdrt inspect shows it), "
                   f"else {BUILTIN_DEFAULTS.steps}")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 runs the conditional half only; default: the engine "
                   f"dir's recommended, else {BUILTIN_DEFAULTS.guidance_scale}")
    p.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                   help="rescale guided predictions toward the conditional one's spread, in [0, 1] (diffusers' "
                   "guidance_rescale); default: the engine dir's recommended, else "
                   f"{BUILTIN_DEFAULTS.guidance_rescale:g}")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampler; default: the engine dir's recommended, else the checkpoint's own scheduler")
    p.add_argument("--seed", type=int, default=None, help="random seed; default: a random one, recorded in the PNG")
    p.add_argument("--height", type=int, default=None, help="image height in pixels; default: the model's native")
    p.add_argument("--width", type=int, default=None, help="image width in pixels; default: the model's native")
    p.add_argument("--num-images", type=int, default=1,
                   help="images to generate (numbered OUT-1.png, OUT-2.png, ...), image i seeded SEED + i - 1")
    p.add_argument("--init-image", type=Path, default=None, metavar="PATH",
                   help="start from this image (image-to-image)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="image-to-image: how much of the init image is replaced, in (0, 1]")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode the init image) in overlapping tiles of the VAE's sample_size (SD 1.5: "
                   "512 px) when the image is larger, as diffusers' enable_vae_tiling: less VAE memory, an image "
                   "that differs slightly")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="engine backend: cpu (ONNX Runtime), openvino (OpenVINO on the CPU, bf16 where the CPU has "
                   "it; sdrt[openvino]), cuda (onnxruntime-gpu on the fp16 graphs), tensorrt (engines from `sdrt "
                   "build`), or auto: the first of tensorrt, cuda, openvino, cpu that can run here (`sdrt doctor "
                   "ENGINE_DIR` says which and why)")
    _add_cpu_precision(p)
    p.add_argument("-o", "--out", type=Path, default=Path("sdrt.png"), metavar="OUT.png", help="output PNG")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    import secrets

    from .generate import GenerateRequest, generate

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    paths = generate(GenerateRequest(
        engine_dir=args.engine_dir, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler, seed=seed, height=args.height,
        width=args.width, num_images=args.num_images, init_image=args.init_image, strength=args.strength,
        backend=args.backend, out=args.out, guidance_rescale=args.guidance_rescale, vae_tiling=args.vae_tiling,
        cpu_precision=args.cpu_precision))
    for path in paths:
        print(path)
    return 0


def _run_inspect(args) -> int:
    from .inspect import render
    from .manifest import Manifest

    manifest = Manifest.load(args.engine_dir)
    print(manifest.to_json() if args.json else render(manifest, args.engine_dir), end="")
    return 0


def _add_bench(sub) -> None:
    from .backend import BACKENDS
    from .bench import BASELINES, DEFAULT_PROMPT

    p = sub.add_parser(
        "bench",
        help="measure per-stage latency and memory, against diffusers in the same run",
        description="Time text encoding, each UNet step, VAE decode (and encode for --init-image), the runtime's "
        "own overhead, end to end, cold start and peak memory, for sdrt on each --backend and, with --baseline, "
        "for diffusers' own pipeline on the same weights. Each contender runs in its own process; runs alternate "
        "between them. Prints a table; --json writes the full report (schema: benchmarks/README.md).",
        formatter_class=_Formatter,
    )
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine dir written by sdrt export")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=["auto"], metavar="NAME",
                   help=f"sdrt backends to measure, from: {', '.join(BACKENDS)}")
    p.add_argument("--baseline", choices=BASELINES, default=None,
                   help="also measure diffusers in PyTorch on the same weights (fp32 on a CPU, fp16 + SDPA on CUDA); "
                   "needs the export extra")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                   help="the baseline's diffusers checkpoint; default: the engine dir's source")
    p.add_argument("--height", type=int, default=None, help="image height; default: the model's native")
    p.add_argument("--width", type=int, default=None, help="image width; default: the model's native")
    p.add_argument("--batch", type=int, default=1, help="images per generation")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps; default: the engine dir's recommended, else {BUILTIN_DEFAULTS.steps}")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampler; default: the engine dir's recommended, else the checkpoint's own")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance scale; default: the engine dir's recommended, else {BUILTIN_DEFAULTS.guidance_scale}")
    p.add_argument("--init-image", type=Path, default=None, metavar="PATH",
                   help="measure image-to-image from this picture (adds the VAE encode stage)")
    p.add_argument("--strength", type=float, default=0.8, help="image-to-image strength, in (0, 1]")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt every run draws")
    p.add_argument("--runs", type=int, default=3, help="measured runs per contender")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per contender after the first image")
    _add_cpu_precision(p)
    p.add_argument("--vae-tiling", action="store_true",
                   help="every contender decodes in tiles (sdrt's vae_tiling, diffusers' vae.enable_tiling())")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report as JSON here")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from .bench import BenchRequest, render, run_bench

    if args.json is not None and not args.json.resolve().parent.is_dir():
        raise UserError(f"output folder {args.json.parent} does not exist")
    report = run_bench(BenchRequest(
        engine_dir=args.engine_dir, backends=tuple(args.backend), baseline=args.baseline, checkpoint=args.checkpoint,
        height=args.height, width=args.width, batch=args.batch, steps=args.steps, scheduler=args.scheduler,
        guidance_scale=args.guidance, init_image=args.init_image, strength=args.strength, prompt=args.prompt,
        runs=args.runs, warmup=args.warmup, command=" ".join(["sdrt", *sys.argv[1:]]),
        cpu_precision=args.cpu_precision, vae_tiling=args.vae_tiling))
    if args.json is not None:  # written whole or not at all
        partial = args.json.with_name(f".{args.json.name}.partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(args.json)
    print(render(report), end="")
    return 0


def _add_build(sub) -> None:
    from .engines import DEFAULT_MAX_BATCH

    p = sub.add_parser(
        "build",
        help="build TensorRT engines for this GPU from an engine dir's graphs",
        description="Build one strongly typed TensorRT engine per component from its fp16 graph (fp32 where the "
        "export kept it fp32), on the GPU that will run it: engines are specific to a GPU compute capability and "
        "a TensorRT version, so export on any machine and build on the serving one. Engines go into the "
        "component folders, named by GPU, TensorRT version, graph and profile, and the manifest lists them. "
        "By default an engine takes every size the engine dir does, tuned for the native one, and 1 to "
        f"{DEFAULT_MAX_BATCH} images; --static fixes one size and batch (smaller and faster). A timing cache in "
        "the engine dir makes rebuilds fast. Needs an NVIDIA GPU and pip install 'sdrt[tensorrt]'.",
        formatter_class=_Formatter,
    )
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine dir written by sdrt export")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=None, metavar="NAME",
                   help="components to build; default: all of the engine dir's")
    p.add_argument("--static", default=None, metavar="HxW",
                   help="build for this one size (pixels, e.g. 512x512) and --batch images only")
    p.add_argument("--batch", type=int, default=None,
                   help="images per call the engines are tuned for (with --static: the only batch); default 1")
    p.add_argument("--min", dest="min_size", default=None, metavar="HxW",
                   help="smallest image size the engines take; default: the engine dir's smallest")
    p.add_argument("--opt", dest="opt_size", default=None, metavar="HxW",
                   help="the size TensorRT tunes for; default: the model's native size")
    p.add_argument("--max", dest="max_size", default=None, metavar="HxW",
                   help="largest image size the engines take; default: the engine dir's largest")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"most images per call; default {DEFAULT_MAX_BATCH} (activation memory grows with it)")
    p.add_argument("--optimization-level", type=int, choices=range(6), default=3, metavar="N",
                   help="TensorRT builder optimization level 0-5: higher searches longer for faster kernels")
    p.add_argument("--workspace", type=float, default=0, metavar="GiB",
                   help="most scratch memory a kernel may use while building; 0: TensorRT's default (the GPU's)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are already up to date")
    p.set_defaults(run=_run_build)


def _run_build(args) -> int:
    from .engines import BuildShapes
    from .manifest import Manifest
    from .tensorrt_build import BuildSettings, TrtBuilder, build_engines

    manifest = Manifest.load(args.engine_dir)
    shapes = BuildShapes.from_flags(manifest, static=args.static, batch=args.batch, min_size=args.min_size,
                                    opt_size=args.opt_size, max_size=args.max_size, max_batch=args.max_batch)
    if args.workspace < 0:
        raise UserError(f"--workspace must be >= 0, got {args.workspace}")
    settings = BuildSettings(optimization_level=args.optimization_level, workspace_gib=args.workspace)
    build_engines(args.engine_dir, TrtBuilder(settings), shapes,
                  tuple(args.components) if args.components else None, settings, force=args.force)
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="show this machine's CPU, GPUs and backends, and which can run an engine dir",
        description="Print the CPU, the NVIDIA GPUs (through NVML), driver and CUDA version, the installed "
        "backends and their versions; with ENGINE_DIR, which backends can run it here and why the others cannot.",
        formatter_class=_Formatter,
    )
    p.add_argument("engine_dir", type=Path, nargs="?", default=None, metavar="ENGINE_DIR",
                   help="also check this engine dir")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_run_doctor)


def _run_doctor(args) -> int:
    from .doctor import render, report

    r = report(args.engine_dir)
    print(json.dumps(r, indent=2) if args.json else render(r), end="\n" if args.json else "")
    return 0


def _add_warmup(sub) -> None:
    from .backend import CPU_BACKENDS

    p = sub.add_parser(
        "warmup",
        help="build the CPU backends' load caches of an engine dir, and time its cold start",
        description="Load ENGINE_DIR on each CPU backend once, building what a first load builds (ONNX Runtime's "
        "optimized graphs beside each graph; OpenVINO's fp16-weight IR (bf16) or compiled models (f32) in "
        "openvino-cache/), draw one image, then "
        "load again from those caches and draw again: prints the load and first-image times of both. Run it at "
        "deploy time so that every later load is the fast one.",
        formatter_class=_Formatter,
    )
    p.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine dir written by sdrt export")
    p.add_argument("--backend", nargs="+", choices=("auto", *CPU_BACKENDS), default=["auto"], metavar="NAME",
                   help=f"CPU backends to warm, from: auto, {', '.join(CPU_BACKENDS)} (auto: openvino where it is "
                   "installed, else cpu)")
    _add_cpu_precision(p)
    p.add_argument("--steps", type=int, default=1, help="denoising steps of each timed image")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the timings as JSON here")
    p.set_defaults(run=_run_warmup)


def _run_warmup(args) -> int:
    from .warmup import warmup

    report = warmup(args.engine_dir, tuple(args.backend), args.cpu_precision, args.steps,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdrt")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdrt",
        description="Stable Diffusion deployment engine: export checkpoints to engine dirs and run them.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"sdrt {_version()}",
                        help="print sdrt's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_export(sub)
    _add_inspect(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_build(sub)
    _add_doctor(sub)
    serve_cli.add_parser(sub, _Formatter, _add_cpu_precision)
    _add_warmup(sub)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a service manager, `timeout`) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.run(args)
    except UserError as e:
        print(f"sdrt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sdrt: {args.command} interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
