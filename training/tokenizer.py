"""The real CLIP BPE tokenizer files, rebuilt from OpenAI's merge list.

The merge list `bpe_simple_vocab_16e6.txt.gz` is data shipped inside the `open_clip_torch` wheel on PyPI; we
fetch the wheel with `pip download --no-deps` and read that one file (open_clip itself is never installed).
The vocabulary is built exactly as CLIP's `SimpleTokenizer` does (openai/CLIP clip/simple_tokenizer.py):
the 256 byte-unicode symbols, the same with `</w>`, one token per merge of lines [1 : 49152-256-2+1], then
`<|startoftext|>` and `<|endoftext|>`: 49408 tokens, the ids of openai/clip-vit-large-patch14. Text the merges
do not cover (Chinese, for one) falls back to byte-level tokens, so Chinese prompts tokenize too.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sdrt.export.random_model import BOS, EOS, bytes_to_unicode  # CLIP's byte alphabet and special tokens

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
MAX_LENGTH = 77


def fetch_bpe(dest: Path) -> Path:
    """Download the open_clip_torch wheel (no dependencies) and extract only the BPE merge list."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", OPEN_CLIP_WHEEL, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            dest.write_bytes(z.read(BPE_MEMBER))
    return dest


def write_tokenizer_files(bpe_gz: Path, out_dir: Path) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as in SD 1.5."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header, as in CLIP
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE == len(set(vocab)), len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", "utf-8")
