"""Prompt -> input_ids with the engine dir's tokenizer.json (Hugging Face `tokenizers`, no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import UserError


class PromptTokenizer:
    """Encodes prompts exactly as StableDiffusionPipeline does: bos, tokens, eos, padded/cut to max_length.

    Truncation and padding are stored in tokenizer.json by the exporter, so this is one `encode_batch`.
    """

    def __init__(self, path: Path, max_length: int):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise UserError(f"cannot read tokenizer {path}: {e}") from None
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids = np.array([e.ids for e in self._tok.encode_batch(list(prompts))], dtype=np.int64)
        if ids.shape[1:] != (self.max_length,):
            raise UserError(f"tokenizer gave {ids.shape[1]} tokens per prompt, the engine expects {self.max_length}")
        return ids
