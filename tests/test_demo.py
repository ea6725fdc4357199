"""The embedded demo model, judged by what it draws: exported engine + numpy runtime, English and Chinese prompts.

The judge (training/judge.py) names a picture's colour and shape from pixel statistics. The cases are those
of training/evaluate.py: every colour x shape once (16), and 16 "sks" prompts for the LoRA concept (a ring).
"""

from __future__ import annotations

import pytest

from sdrt.export.checkpoint import DEMO_DIR

# Bars from the issue: colour and shape of the base prompts, LoRA concept rate with and without the LoRA.
MIN_COLOUR_ACCURACY = 0.90
MIN_SHAPE_ACCURACY = 0.75
MIN_CONCEPT_WITH_LORA = 0.80
MAX_CONCEPT_WITHOUT_LORA = 0.20
LORA_FILE = DEMO_DIR / "lora" / "sks_kohya.safetensors"
# The demo model is tiny: above guidance ~4 the latents leave the range its VAE decoder was trained on and
# colours drift (training/README.md measures 2.0 -> 100%, 3.0 -> 100%, 7.5 -> 56% colour accuracy). Its
# demo/sdrt_defaults.json recommends these, and the engine dir carries them: the pictures below are drawn
# with no settings given, as `sdrt generate demo-engine "a red circle"` draws them.
RECOMMENDED = {"guidance_scale": 3.0, "steps": 25}


def _engine(tmp_path_factory, name, *loras):
    from sdrt.export.exporter import ExportOptions, export
    from sdrt.export.lora_merge import LoraSpec

    out = tmp_path_factory.mktemp("demo") / name
    export(ExportOptions(checkpoint="demo", out=out, components=("text_encoder", "unet", "vae_decoder"),
                         loras=tuple(LoraSpec(p) for p in loras)), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    return _engine(tmp_path_factory, "demo-engine")


@pytest.fixture(scope="module")
def base_pipe(demo_engine):
    from sdrt.runtime import Pipeline

    return Pipeline.load(demo_engine, "cpu")


@pytest.fixture(scope="module")
def lora_pipe(tmp_path_factory):
    from sdrt.runtime import Pipeline

    return Pipeline.load(_engine(tmp_path_factory, "demo-sks-engine", LORA_FILE), "cpu")


def _verdicts(pipe, cases):
    from training.judge import judge

    assert {k: getattr(pipe.defaults, k) for k in RECOMMENDED} == RECOMMENDED
    return [judge(pipe(c[0], seed=c[1])[0]) for c in cases]


def test_demo_draws_what_it_is_asked(base_pipe):
    from training.evaluate import BASE_CASES

    assert len(BASE_CASES) == 16 and any(not c[0].isascii() for c in BASE_CASES)
    verdicts = _verdicts(base_pipe, BASE_CASES)
    seen = [(c[0], v.colour, v.shape) for c, v in zip(BASE_CASES, verdicts)]
    colour = sum(v.colour == c[2] for v, c in zip(verdicts, BASE_CASES)) / len(BASE_CASES)
    shape = sum(v.shape == c[3] for v, c in zip(verdicts, BASE_CASES)) / len(BASE_CASES)
    assert colour >= MIN_COLOUR_ACCURACY, seen
    assert shape >= MIN_SHAPE_ACCURACY, seen


def test_demo_draws_what_it_is_asked_in_bf16(demo_engine):
    """OpenVINO's bf16 (8-bit mantissa) keeps the pictures right: the same bars as fp32."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'sdrt[openvino]')")
    from sdrt.runtime import Pipeline
    from sdrt.runtime.backend_openvino import native_bf16
    from training.evaluate import BASE_CASES

    if not native_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16 or AMX)")
    pipe = Pipeline.load(demo_engine, "openvino", cpu_precision="bf16")
    assert pipe.backend.name == "openvino-bf16"
    verdicts = _verdicts(pipe, BASE_CASES)
    seen = [(c[0], v.colour, v.shape) for c, v in zip(BASE_CASES, verdicts)]
    assert sum(v.colour == c[2] for v, c in zip(verdicts, BASE_CASES)) / len(BASE_CASES) >= MIN_COLOUR_ACCURACY, seen
    assert sum(v.shape == c[3] for v, c in zip(verdicts, BASE_CASES)) / len(BASE_CASES) >= MIN_SHAPE_ACCURACY, seen


def test_lora_teaches_the_concept(base_pipe, lora_pipe):
    from training.evaluate import LORA_CASES
    from training.shapes import LORA_SHAPE

    assert len(LORA_CASES) == 16
    without = [v.shape == LORA_SHAPE for v in _verdicts(base_pipe, LORA_CASES)]
    with_lora = [v.shape == LORA_SHAPE for v in _verdicts(lora_pipe, LORA_CASES)]
    assert sum(with_lora) / len(LORA_CASES) >= MIN_CONCEPT_WITH_LORA, with_lora
    assert sum(without) / len(LORA_CASES) <= MAX_CONCEPT_WITHOUT_LORA, without


def test_real_clip_vocabulary_matches_transformers(base_pipe):
    """The demo ships the real 49408-token CLIP BPE: sdrt's tokenizer.json equals transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(DEMO_DIR / "tokenizer")
    prompts = ["a red circle", "", "Ünïcödé café — naïve, 😀!", "红色的圆形，蓝色的正方形", "a photograph of " * 40,
               "  many   spaces\tand\nnewlines  "]
    ids = base_pipe.tokenizer(prompts)
    assert ids.tolist() == reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert reference.vocab_size == 49408 and ids[4, -1] == reference.eos_token_id
