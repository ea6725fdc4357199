"""Read the tensors of one weight file, .safetensors or a weights-only .ckpt pickle, without loading it all.

Shapes are known before any tensor is read (family detection and configs need only them); tensors are read
one at a time as float32, so a 7 GB fp32+EMA file never sits in memory twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdrt.runtime.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Training callbacks that old Lightning checkpoints pickle beside the weights (sd-v1-x .ckpt files). Their
# names are mapped to an inert placeholder: weights-only loading builds it without running any of its code.
INERT_MODULES = ("pytorch_lightning.", "lightning.")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "U8": "uint8", "BOOL": "bool"}


class _Inert:
    """Stands in for a pickled training object; keeps nothing."""

    def __setstate__(self, state):
        pass


class TensorFile:
    """The tensors of a file by key (after unwrapping nested "state_dict" entries), with their shapes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata: dict = {}
        self.global_step: int | None = None
        self.used: set[str] = set()  # keys read so far: what a load leaves out is reported, not silently lost
        self.aliases: dict[str, str] = {}  # extra key -> the file's key (an EMA-only file's UNet)
        if self.path.suffix in SAFETENSORS_SUFFIXES:
            self._open_safetensors()
        elif self.path.suffix in PICKLE_SUFFIXES:
            self._open_pickle()
        else:
            raise UserError(f"{path}: unknown weight file type '{self.path.suffix}' "
                            f"(sdrt reads {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})")
        self.dtypes = sorted({self._dtype(k) for k in self.shapes})

    def _open_safetensors(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            self._st = safe_open(str(self.path), framework="pt")
            self.shapes = {k: tuple(self._st.get_slice(k).get_shape()) for k in self._st.keys()}
            self.metadata = self._st.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {self.path}: {e} (a truncated or corrupt safetensors file?)") from None
        self._tensors = None

    def _open_pickle(self) -> None:
        names = self._unsafe_globals()
        inert = [(_Inert, n) for n in names if n.startswith(INERT_MODULES)]
        refused = [n for n in names if not n.startswith(INERT_MODULES)]
        if refused:
            raise UserError(f"refused {self.path}: the pickle names {refused[0]}, which weights-only loading does "
                            "not build; only tensors are loaded (convert it to .safetensors in a trusted environment)")
        try:
            with torch.serialization.safe_globals(inert):
                data = self._load(mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad pickle; the user gets one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"cannot read {self.path}: {first}") from None
        step = data.get("global_step") if isinstance(data, dict) else None
        self.global_step = int(step) if isinstance(step, (int, torch.Tensor)) and not isinstance(step, bool) else None
        while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise UserError(f"{self.path} holds a {type(data).__name__}, not a dict of tensors")
        self._tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self._st = None

    def _unsafe_globals(self) -> list[str]:
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(str(self.path))
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            if "zip" in str(e).lower() or "legacy" in str(e).lower():
                return []  # the pre-1.6 pickle format: weights-only loading still refuses unknown globals
            raise UserError(f"cannot read {self.path}: {str(e).splitlines()[0]} (a truncated or corrupt file?)") \
                from None

    def _load(self, mmap: bool):
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                return torch.load(self.path, map_location="cpu", weights_only=True)
            raise

    def _dtype(self, key: str) -> str:
        if self._st is not None:
            code = self._st.get_slice(key).get_dtype()
            return SAFETENSORS_DTYPES.get(code, code.lower())
        return str(self._tensors[key].dtype).removeprefix("torch.")

    def alias(self, names: dict[str, str]) -> None:
        """Make each existing tensor `names[new]` readable under the key `new` as well."""
        self.aliases = {**self.aliases, **names}
        self.shapes = {**self.shapes, **{new: self.shapes[old] for new, old in names.items()}}

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        """One tensor as float32 (fp16/bf16 files are widened; the export runs in fp32)."""
        if key not in self.shapes:
            raise UserError(f"{self.path}: missing tensor {key} (a truncated or partial checkpoint?)")
        key = self.aliases.get(key, key)
        self.used.add(key)
        t = self._st.get_tensor(key) if self._st is not None else self._tensors[key]
        return t.to(torch.float32) if t.is_floating_point() else t

    def unused(self) -> dict[str, int]:
        """Tensors never read, counted by their first two key levels (e.g. `model_ema`, `cond_stage_model.model`)."""
        groups: dict[str, int] = {}
        for key in sorted(set(self.shapes) - self.used - set(self.aliases)):
            parts = key.split(".")
            group = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
            groups[group] = groups.get(group, 0) + 1
        return groups

    def close(self) -> None:
        self._st = self._tensors = None
