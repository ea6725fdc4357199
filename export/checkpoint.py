"""Read a checkpoint, a diffusers folder or a single file: check it, detect its model family, load its modules.

Every problem a user can cause (missing folder, not a diffusers SD folder, corrupt weights, unsupported
family) becomes one `UserError` line before anything is written. Single files are export/single_file.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import UserError
from sdrt.runtime.manifest import SUPPORTED_FAMILIES, GenerationDefaults
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from sdrt.runtime.schedulers.parameterization import PREDICTION_TYPES

from .families import FAMILIES, ExportFamily

BASE_PARTS = ("unet", "vae", "scheduler")  # besides each family's text encoders and tokenizers
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The shipped demo model, package data of `sdrt.demo` (the checkout's demo/ in an editable install): a path
# that starts with `demo` and does not exist resolves inside it, from any folder (`--checkpoint demo`,
# `--lora demo/lora/sks_kohya.safetensors`).
DEMO_NAME = "demo"
DEMO_PACKAGE = "sdrt.demo"
# Optional, beside model_index.json: the checkpoint's recommended generation settings, e.g.
# {"guidance_scale": 3.0, "steps": 25, "scheduler": "pndm"}; the engine dir carries them (manifest `defaults`).
DEFAULTS_FILE = "sdrt_defaults.json"


@dataclass(frozen=True)
class SourceOptions:
    """How to read the checkpoint where its own files are wrong or silent (recorded in the manifest)."""

    vae: str | None = None  # a VAE file or folder replacing the checkpoint's
    prediction_type: str | None = None  # "epsilon" | "v_prediction"
    native_size: int | None = None  # pixels
    tokenizer: str | None = None  # single files: a tokenizer folder instead of sdrt's CLIP vocabulary
    ema: bool = True  # single files with an EMA copy of the UNet: use it

    def overrides(self) -> dict:
        given = dict(vae=self.vae and str(resolve_path(self.vae).resolve()), prediction_type=self.prediction_type,
                     native_size=self.native_size, tokenizer=self.tokenizer and str(Path(self.tokenizer).resolve()),
                     ema=None if self.ema else False)
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    family: str
    model_index: dict
    unet_config: dict
    vae_config: dict | None
    defaults: GenerationDefaults = GenerationDefaults()
    options: SourceOptions = SourceOptions()
    single_file: object | None = None  # export/single_file.py's SingleFile plan when the source is one file

    @property
    def spec(self) -> ExportFamily:
        return FAMILIES[self.family]

    def source(self) -> dict:
        """The manifest's record of where the weights came from (sha256 over the bytes) and how they were read."""
        record = dict(path=str(self.path.resolve()), format="single-file" if self.single_file else "diffusers",
                      fingerprint=fingerprint(self.path))
        if self.single_file:
            record["detected"] = {**self.single_file.detected, "unused_tensors": self.single_file.file.unused()}
        if overrides := self.options.overrides():
            record["overrides"] = overrides
        if self.options.vae:
            record["vae"] = dict(path=overrides["vae"], fingerprint=fingerprint(resolve_path(self.options.vae)))
        return record


def _demo_dir() -> Path | None:
    """The demo model's folder, found without importing (or byte-compiling into) it."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec else []
    return Path(locations[0]) if locations else None


DEMO_DIR = _demo_dir()


def resolve_path(arg: str | Path) -> Path:
    """`arg` as given if it exists; else, if it starts with `demo`, the same path inside the shipped demo model."""
    path = Path(arg)
    if path.exists() or DEMO_DIR is None or not path.parts or path.parts[0] != DEMO_NAME:
        return path
    shipped = DEMO_DIR.joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def detect_family(model_index: dict, unet_config: dict) -> str:
    """Name the model family from the configs alone (research/lora_taiyi_schedulers.md §2.c).

    Variants sdrt does not export get their own names, so the refusal says what the checkpoint is.
    """
    pipeline = model_index.get("_class_name", "")
    text_encoder = (model_index.get("text_encoder") or [None, None])[1]
    in_channels = unet_config.get("in_channels", 4)
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        # The refiner has only the bigG encoder and conditions on an aesthetic score instead of the target size.
        if text_encoder is None or model_index.get("requires_aesthetics_score"):
            return "sdxl-refiner"
        return "sdxl-inpaint" if in_channels != 4 else "sdxl"
    if pipeline.startswith(("StableDiffusion3", "Flux")) or "transformer" in model_index:
        return pipeline.replace("Pipeline", "").lower() or "dit"
    if in_channels != 4:
        return "sd-inpaint" if in_channels == 9 else f"sd-{in_channels}-channel ({pipeline or 'no pipeline class'})"
    if text_encoder == "BertModel":
        return "taiyi"
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    if text_encoder == "CLIPTextModel" and pipeline.startswith("StableDiffusion"):
        return "sd1"
    return f"unknown ({pipeline or 'no pipeline class'})"


def check_weights(folder: Path) -> list[Path]:
    """Every weight file of a component folder; a truncated or corrupt safetensors file is refused."""
    from safetensors import SafetensorError, safe_open

    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(f"{folder} has no weights (*.safetensors or *.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt") as st:
                    st.keys()
            except (SafetensorError, OSError) as e:
                raise UserError(f"corrupt safetensors file {f}: {e}") from None
    return files


def _check_options(opts: SourceOptions) -> None:
    if opts.vae is not None and not resolve_path(opts.vae).exists():
        raise UserError(f"--vae {opts.vae}: not found")
    if opts.tokenizer is not None and not Path(opts.tokenizer).is_dir():
        raise UserError(f"--tokenizer {opts.tokenizer}: not a folder")
    if opts.prediction_type is not None and opts.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type {opts.prediction_type}: choose from {', '.join(PREDICTION_TYPES)}")
    if opts.native_size is not None and opts.native_size <= 0:
        raise UserError(f"--native-size must be positive, got {opts.native_size}")


def open_checkpoint(arg: str | Path, opts: SourceOptions = SourceOptions()) -> Checkpoint:
    """Check the layout, the weights and the family; load nothing heavy."""
    path = resolve_path(arg)
    if not path.exists():
        raise UserError(f"checkpoint not found: {arg}")
    _check_options(opts)
    if path.is_file():
        return _open_single_file(path, opts)
    if opts.tokenizer is not None or not opts.ema:
        raise UserError("--tokenizer and --no-ema apply to single-file checkpoints; a diffusers folder has its own")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{arg} is not a diffusers Stable Diffusion checkpoint (no model_index.json)")
    model_index = _read_json(index_path)
    unet_config = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else {}
    family = detect_family(model_index, unet_config)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(
            f"unsupported model family '{family}' in {arg} (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    family_spec = FAMILIES[family]
    encoders = [r.component for r in family_spec.text_encoders]
    required = [*encoders, *(r.tokenizer for r in family_spec.text_encoders), *BASE_PARTS]
    missing = [p for p in required if not (path / p).is_dir()]
    if missing:
        raise UserError(f"{arg} is not a complete diffusers {family} checkpoint: missing {', '.join(missing)}/")
    for role in family_spec.text_encoders:
        for folder, name, allowed in ((role.component, role.component, role.classes),
                                      (role.tokenizer, role.tokenizer, role.tokenizer_classes)):
            cls = (model_index.get(name) or [None, None])[1]
            if cls not in allowed:
                raise UserError(f"{arg}: {name} is {cls}; a {family} checkpoint has {' or '.join(allowed)}")
    for part in (*encoders, "unet", "vae"):
        check_weights(path / part)
    vae_config = _read_json(path / "vae" / "config.json")
    return Checkpoint(path=path, family=family, model_index=model_index, unet_config=unet_config,
                      vae_config=vae_config, defaults=read_defaults(path / DEFAULTS_FILE), options=opts)


def _open_single_file(path: Path, opts: SourceOptions) -> Checkpoint:
    from .single_file import open_single_file

    family, plan = open_single_file(path, opts)
    spec = FAMILIES[family]
    model_index = {"_class_name": spec.pipeline,
                   **{r.component: ["transformers", e.model_class] for r, e in zip(spec.text_encoders, plan.encoders)}}
    return Checkpoint(path=path, family=family, model_index=model_index, unet_config=plan.unet_config,
                      vae_config=plan.vae_config, options=opts, single_file=plan)


def check_defaults(defaults: GenerationDefaults, where: str) -> GenerationDefaults:
    if defaults.scheduler is not None and defaults.scheduler not in SCHEDULER_NAMES:
        raise UserError(f"{where}: unknown scheduler '{defaults.scheduler}' "
                        f"(choose from: {', '.join(SCHEDULER_NAMES)})")
    return defaults


def read_defaults(path: Path) -> GenerationDefaults:
    """The checkpoint's recommended settings (DEFAULTS_FILE), or none if it has no such file."""
    if not path.is_file():
        return GenerationDefaults()
    d = _read_json(path)
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object of settings, got {type(d).__name__}")
    try:
        return check_defaults(GenerationDefaults.from_dict(d), str(path))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def _fingerprinted(path: Path, f: Path) -> bool:
    """Hidden files and Python bytecode (an installed package's __pycache__) are not part of a checkpoint."""
    parts = f.relative_to(path).parts
    return f.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in parts)


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or over every file's relative path and bytes of a folder: same input, same value."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    for f in sorted(p for p in path.rglob("*") if _fingerprinted(path, p)):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _has_safetensors(folder: Path) -> bool:
    """Say which weights to read, so a .bin-only folder does not log a failed safetensors lookup."""
    return any(folder.glob("*.safetensors"))


def _caused_by(e: BaseException | None, kind: type) -> bool:
    while e is not None:
        if isinstance(e, kind):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _quiet_loading():
    """diffusers/transformers log a progress bar and advice per module; sdrt prints its own progress."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level in zip((dlog, tlog), levels):
            lib.set_verbosity(level)
            lib.enable_progress_bar()


def load_modules(ckpt: Checkpoint) -> dict:
    """The torch modules and the tokenizer/scheduler objects, fp32, in eval mode; --vae replaces the VAE.

    Text encoders and tokenizers are keyed by their checkpoint folder names (text_encoder, tokenizer_2, ...);
    their classes come from model_index.json, already checked against the family's allowed ones.
    """
    from .single_file import LDM_FAMILIES, load_single_file, load_vae

    opts = ckpt.options
    with _quiet_loading():
        if ckpt.single_file is not None:
            names = {r.component: r.tokenizer for r in ckpt.spec.text_encoders}
            tokenizer = Path(opts.tokenizer) if opts.tokenizer else None
            modules = load_single_file(ckpt.single_file, tokenizer, names)
        else:
            modules = _load_folder(ckpt)
        if opts.vae:
            unet = modules["unet"].config
            scaling = (ckpt.vae_config or {}).get("scaling_factor") or LDM_FAMILIES[ckpt.family].vae_scaling
            modules["vae"] = load_vae(resolve_path(opts.vae), scaling, unet.sample_size * 8)
    return modules


def _load_folder(ckpt: Checkpoint) -> dict:
    import diffusers
    import torch
    import transformers

    p = ckpt.path

    def weights(folder: str, cls):
        return cls.from_pretrained(p / folder, torch_dtype=torch.float32,
                                   use_safetensors=_has_safetensors(p / folder))

    try:
        with _quiet_loading():
            scheduler_cls = getattr(diffusers, ckpt.model_index["scheduler"][1])
            modules = {}
            for role in ckpt.spec.text_encoders:
                modules[role.component] = weights(role.component,
                                                  getattr(transformers, ckpt.model_index[role.component][1]))
                tokenizer_cls = getattr(transformers, ckpt.model_index[role.tokenizer][1])
                modules[role.tokenizer] = tokenizer_cls.from_pretrained(p / role.tokenizer)
            modules.update(
                unet=weights("unet", diffusers.UNet2DConditionModel),
                vae=weights("vae", diffusers.AutoencoderKL),
                scheduler=scheduler_cls.from_pretrained(p / "scheduler"),
            )
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, pickle.UnpicklingError) as e:
        if _caused_by(e, pickle.UnpicklingError):
            # torch's message suggests weights_only=False, which would run the pickle's code: never do that.
            raise UserError(f"refused {p}: a .bin weight file is a pickle that carries code; only tensors are "
                            "loaded (convert it to .safetensors in a trusted environment)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"cannot load {p}: {first}") from None
    for name in (*(r.component for r in ckpt.spec.text_encoders), "unet", "vae"):
        modules[name].eval().requires_grad_(False)
    return modules
