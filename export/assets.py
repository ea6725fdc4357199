"""The non-graph files of an engine dir: tokenizer.json and scheduler.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sdrt.runtime.manifest import SCHEDULER_FILE, TOKENIZER_FILE


def _plain(value):
    """A diffusers config value as plain JSON (tuples to lists, numpy scalars to Python)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_tokenizer(tokenizer, out_dir: Path) -> dict:
    """Save the fast tokenizer with truncation and padding set as StableDiffusionPipeline tokenizes prompts.

    The pipeline calls `tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)`:
    bos + tokens + eos, cut at max_length (eos kept), padded with the pad token.
    """
    max_length = int(tokenizer.model_max_length)
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    pad_id = tokenizer.pad_token_id
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=pad_id, pad_token=tokenizer.pad_token)
    backend.save(str(out_dir / TOKENIZER_FILE))
    return dict(
        file=TOKENIZER_FILE,
        max_length=max_length,
        pad_token=tokenizer.pad_token,
        pad_id=pad_id,
        bos_token=tokenizer.bos_token,
        bos_id=tokenizer.bos_token_id,
        eos_token=tokenizer.eos_token,
        eos_id=tokenizer.eos_token_id,
    )


def write_scheduler(scheduler, out_dir: Path) -> dict:
    """Save the scheduler config with its float32 alphas_cumprod.

    The values are saved rather than recomputed: numpy cannot reproduce torch's float32 linspace/cumprod
    bit for bit (research/lora_taiyi_schedulers.md §3.0).
    """
    config = {k: _plain(v) for k, v in dict(scheduler.config).items()}
    alphas = scheduler.alphas_cumprod.detach().cpu().numpy().astype(np.float32)
    class_name = scheduler.__class__.__name__
    payload = dict(class_name=class_name, config=config, alphas_cumprod=[float(a) for a in alphas])
    (out_dir / SCHEDULER_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    return dict(file=SCHEDULER_FILE, class_name=class_name,
                prediction_type=config.get("prediction_type", "epsilon"))
