"""The non-graph files of an engine dir: one tokenizer file per text encoder, and scheduler.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sdrt.runtime.manifest import SCHEDULER_FILE, TOKENIZER_FILE
from sdrt.runtime.pipeline import override_config


def _plain(value):
    """A diffusers config value as plain JSON (tuples to lists, numpy scalars to Python)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def tokenizer_file(component: str) -> str:
    """tokenizer.json for the first text encoder (as in version 1 dirs), tokenizer_2.json for text_encoder_2."""
    suffix = component.removeprefix("text_encoder")
    return TOKENIZER_FILE.replace(".json", f"{suffix}.json")


def write_tokenizer(tokenizer, max_length: int, out_dir: Path, file: str = TOKENIZER_FILE) -> dict:
    """Save the fast tokenizer with truncation and padding set as the SD pipelines tokenize prompts.

    The pipelines call `tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)`:
    the start token (CLIP's bos, BERT's [CLS]), the tokens, the end token (eos, [SEP]), cut at max_length with
    the end token kept, padded with the pad token (CLIP-L: eos; OpenCLIP: "!"; BERT: [PAD]). Normalization
    (BERT: lower-casing, one token per CJK character) is part of the converted tokenizer.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    pad_id = tokenizer.pad_token_id
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=pad_id, pad_token=tokenizer.pad_token)
    backend.save(str(out_dir / file))
    bos = tokenizer.bos_token or getattr(tokenizer, "cls_token", None)
    eos = tokenizer.eos_token or getattr(tokenizer, "sep_token", None)
    return dict(
        file=file,
        max_length=max_length,
        pad_token=tokenizer.pad_token,
        pad_id=pad_id,
        bos_token=bos,
        bos_id=tokenizer.convert_tokens_to_ids(bos) if bos else None,
        eos_token=eos,
        eos_id=tokenizer.convert_tokens_to_ids(eos) if eos else None,
    )


def write_scheduler(scheduler, out_dir: Path, fixes: dict) -> dict:
    """Save the scheduler config as the family's pipeline uses it (`fixes` applied), with its float32 alphas_cumprod.

    The values are saved rather than recomputed: numpy cannot reproduce torch's float32 linspace/cumprod
    bit for bit (research/lora_taiyi_schedulers.md §3.0).
    """
    config = override_config({k: _plain(v) for k, v in dict(scheduler.config).items()}, fixes)
    alphas = scheduler.alphas_cumprod.detach().cpu().numpy().astype(np.float32)
    class_name = scheduler.__class__.__name__
    payload = dict(class_name=class_name, config=config, alphas_cumprod=[float(a) for a in alphas])
    (out_dir / SCHEDULER_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    return dict(file=SCHEDULER_FILE, class_name=class_name,
                prediction_type=config.get("prediction_type", "epsilon"))
