"""Prompts -> the UNet's conditioning inputs, for every family, from the manifest's `conditioning` recipe.

The denoising loop stays family-agnostic: it feeds the UNet `sample`, `timestep` and whatever this module
returns. The recipes (docs/engine-dir.md, "Conditioning") match diffusers' `encode_prompt`:
- SD 1.x, SD 2.x, Taiyi: one text encoder; `encoder_hidden_states` is its last hidden state.
- SDXL: two CLIP encoders; their penultimate hidden states are concatenated, the pooled `text_embeds` come from
  encoder 2, and `time_ids` carry the micro-conditioning sizes. With `force_zeros_for_empty_prompt`, a
  generation given no negative prompt at all uses zeros for the unconditional half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .manifest import Conditioning
from .tokenizer import PromptTokenizer

TEXT_EMBEDS = "text_embeds"  # the pooled output of the `pooled` text encoder, and the UNet input it feeds


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size conditioning (diffusers' original_size, crops_coords_top_left, target_size); None = (H, W)."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    def is_default(self) -> bool:
        return self == MicroConditioning()

    def values(self, height: int, width: int) -> dict[str, float]:
        oh, ow = self.original_size or (height, width)
        top, left = self.crops_coords_top_left
        th, tw = self.target_size or (height, width)
        return dict(original_height=oh, original_width=ow, crop_top=top, crop_left=left,
                    target_height=th, target_width=tw)


def check_pair(name: str, value) -> tuple[int, int] | None:
    """A (height, width)-like pair of non-negative integers, or None."""
    if value is None:
        return None
    try:
        a, b = value
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in (a, b)):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name} must be two non-negative integers, got {value!r}") from None
    return int(a), int(b)


class PromptEncoder:
    """Runs the text encoder(s) of an engine dir; returns the UNet's conditioning feeds."""

    def __init__(self, conditioning: Conditioning, tokenizers: dict[str, PromptTokenizer], backend, components):
        self.recipe = conditioning
        self.tokenizers = tokenizers
        self.backend = backend
        # Output names per text encoder, in graph order: the first is the hidden state the UNet attends to.
        self.outputs = {name: [t.name for t in components[name].outputs] for name in conditioning.text_encoders}

    def _encode(self, prompts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        hidden, pooled = [], None
        for name in self.recipe.text_encoders:
            outs = dict(zip(self.outputs[name], self.backend.run(name, {"input_ids": self.tokenizers[name](prompts)})))
            hidden.append(outs[self.outputs[name][0]])
            if name == self.recipe.pooled:
                pooled = outs[TEXT_EMBEDS]
        return np.concatenate(hidden, axis=-1), pooled

    def __call__(self, prompts: tuple[str, ...], negatives: tuple[str, ...] | None, repeat: int, guided: bool,
                 height: int, width: int, micro: MicroConditioning) -> dict[str, np.ndarray]:
        """Feeds for `len(prompts) * repeat` images; under guidance the unconditional rows come first.

        `negatives` None means no negative prompt was given (not even ""): the recipe decides between
        zeros and the encoding of "".
        """
        hidden, pooled = self._encode(prompts)
        if guided:
            if negatives is None and self.recipe.force_zeros_for_empty_prompt:
                neg_hidden, neg_pooled = np.zeros_like(hidden), None if pooled is None else np.zeros_like(pooled)
            else:
                neg_hidden, neg_pooled = self._encode(negatives or ("",) * len(prompts))
            hidden = np.concatenate([neg_hidden, hidden])
            pooled = None if pooled is None else np.concatenate([neg_pooled, pooled])
        # p0, p0, p1, p1 within each half: diffusers' repeat/view order (np.repeat keeps the halves in place).
        feeds = {"encoder_hidden_states": np.repeat(hidden, repeat, axis=0)}
        if self.recipe.pooled:
            feeds[TEXT_EMBEDS] = np.repeat(pooled, repeat, axis=0)
        if self.recipe.time_ids:
            values = micro.values(height, width)
            row = np.array([values[k] for k in self.recipe.time_ids], dtype=np.float32)
            feeds["time_ids"] = np.tile(row, (feeds["encoder_hidden_states"].shape[0], 1))
        elif not micro.is_default():
            raise UserError("original_size, crops_coords_top_left and target_size apply to SDXL engines only")
        return feeds

