"""Full-size architectures with random weights export on a 24 GB machine (slow; run with `-m slow`).

SD 1.5 UNet ~2 min, SD 2.1-768 text encoder + UNet ~2 min, Taiyi BERT ~1 min, SDXL base UNet + both text
encoders ~5 min with ~16 GiB peak RSS, an SD 1.5 single file (all four components) ~2.5 min with ~8.8 GiB
(checkpoints written included). Time and memory are measured by benchmarks/export_time.py (results in
benchmarks/results/export_*_cpu.json); these tests check what was written.
"""

from __future__ import annotations

import pytest

from sdrt.runtime.manifest import Manifest

# Attention nodes = 2 per transformer block (self + cross) in a UNet, 1 per layer in a text encoder, minus
# layers whose output nothing uses (SDXL's text_encoder conditions on the penultimate hidden state).
SD15_ATTENTION_NODES = 32  # 16 transformer blocks: down 6, mid 1, up 9
SD21_ATTENTION_NODES = 32  # the same layout
SDXL_ATTENTION_NODES = 140  # 70 transformer blocks: down 2x2 + 2x10, mid 10, up 3x10 + 3x2
SDXL_TE1_ATTENTION, SDXL_TE2_ATTENTION = 11, 32  # CLIP-L's 12th layer is dead code; bigG's feeds text_embeds
TAIYI_BERT_ATTENTION = 12


def _export(tmp_path, model: str, components: tuple[str, ...]) -> tuple[Manifest, list[str]]:
    from sdrt.export.exporter import ExportOptions, export
    from sdrt.export.random_model import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / model, model)
    lines = []
    export(ExportOptions(checkpoint=str(ckpt), out=tmp_path / "eng", components=components), log=lines.append)
    m = Manifest.load(tmp_path / "eng")
    for name in components:
        v = m.components[name].artifact().validation
        assert v.max_abs_error <= v.threshold
    return m, lines


@pytest.mark.slow
def test_sd15_unet_exports(tmp_path):
    m, lines = _export(tmp_path, "sd15", ("unet",))
    a = m.components["unet"].artifact()
    assert m.native_resolution == (512, 512)
    assert a.external_data == "unet/model.onnx.data"  # 3.4 GB of fp32 weights cannot sit in one protobuf
    assert a.bytes > 3 * 2**30
    assert a.op_counts["Attention"] == SD15_ATTENTION_NODES
    assert m.components["unet"].axes["latent_height"].describe() == "32..128, multiple of 8"
    assert any(line.startswith("[1/1] unet:") for line in lines)


@pytest.mark.slow
def test_sd21_768_unet_exports(tmp_path):
    m, _ = _export(tmp_path, "sd21-768", ("text_encoder", "unet"))
    assert (m.family, m.native_resolution, m.scheduler["prediction_type"]) == ("sd2", (768, 768), "v_prediction")
    assert m.components["unet"].artifact().op_counts["Attention"] == SD21_ATTENTION_NODES
    assert m.components["text_encoder"].artifact().op_counts["Attention"] == 23  # OpenCLIP-H without its last layer
    assert m.conditioning.context_dim == 1024
    assert m.components["unet"].axes["latent_height"].describe() == "48..192, multiple of 8"


@pytest.mark.slow
def test_taiyi_text_encoder_exports(tmp_path):
    m, _ = _export(tmp_path, "taiyi", ("text_encoder",))
    assert m.family == "taiyi" and m.conditioning.context_length == 512
    a = m.components["text_encoder"].artifact()
    assert a.op_counts["Attention"] == TAIYI_BERT_ATTENTION
    assert m.components["text_encoder"].inputs[0].shape == ("batch", 512)


@pytest.mark.slow
def test_sdxl_unet_and_text_encoders_export(tmp_path):
    m, _ = _export(tmp_path, "sdxl", ("text_encoder", "text_encoder_2", "unet"))
    assert m.family == "sdxl" and m.native_resolution == (1024, 1024)
    assert m.components["unet"].artifact().op_counts["Attention"] == SDXL_ATTENTION_NODES
    assert m.components["unet"].artifact().bytes > 9 * 2**30
    assert m.components["text_encoder"].artifact().op_counts["Attention"] == SDXL_TE1_ATTENTION
    assert m.components["text_encoder_2"].artifact().op_counts["Attention"] == SDXL_TE2_ATTENTION
    assert m.conditioning.context_dim == 2048


@pytest.mark.slow
def test_sd15_single_file_exports(tmp_path):
    """A full-size SD 1.5 file in the original layout (written by sdrt's inverse name maps) exports offline."""
    from sdrt.export.exporter import ExportOptions, export
    from sdrt.export.random_model import write_random_single_file

    path = write_random_single_file(tmp_path / "sd15.safetensors", "sd15")
    components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    lines: list[str] = []
    export(ExportOptions(checkpoint=str(path), out=tmp_path / "eng"), log=lines.append)
    m = Manifest.load(tmp_path / "eng")
    assert (m.family, m.native_resolution, m.source["format"]) == ("sd1", (512, 512), "single-file")
    assert m.source["detected"]["prediction_type"] == "epsilon" and m.tokenizers["text_encoder"]["pad_id"] == 49407
    for name in components:
        v = m.components[name].artifact().validation
        assert v.max_abs_error <= v.threshold, name
    assert m.components["unet"].artifact().op_counts["Attention"] == SD15_ATTENTION_NODES
    assert any(line.startswith("single file: sd1, 1") for line in lines)
