"""Full-size SD 1.5 UNet export with random weights (slow: ~2.5 min, ~8.5 GiB RSS; run with `-m slow`)."""

from __future__ import annotations

import pytest

from sdrt.runtime.manifest import Manifest

# SD 1.5: 16 transformer blocks (down 6, mid 1, up 9) with self- and cross-attention each.
SD15_ATTENTION_NODES = 32


@pytest.mark.slow
def test_sd15_unet_exports(tmp_path):
    from sdrt.export.exporter import ExportOptions, export
    from sdrt.export.random_model import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "sd15", "sd15")
    lines = []
    export(ExportOptions(checkpoint=str(ckpt), out=tmp_path / "eng", components=("unet",)), log=lines.append)
    m = Manifest.load(tmp_path / "eng")
    a = m.components["unet"].artifact()
    assert m.native_resolution == (512, 512)
    assert a.external_data == "unet/model.onnx.data"  # 3.4 GB of fp32 weights cannot sit in one protobuf
    assert a.bytes > 3 * 2**30
    assert a.op_counts["Attention"] == SD15_ATTENTION_NODES
    assert a.validation.max_abs_error <= a.validation.threshold
    assert m.components["unet"].axes["latent_height"].describe() == "32..128, multiple of 8"
    assert any(line.startswith("[1/1] unet:") for line in lines)
