"""kernels/: the chunked-attention graph pass against its numpy reference and ONNX Runtime, and its budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sdrt.kernels.chunked_attention import (
    SCORE_ITEMSIZE,
    attention_reference,
    attention_score_bytes,
    chunk_attention,
    chunked_attention_reference,
    max_chunks,
    split_sizes,
)
from sdrt.kernels.shapes import shapes_for, static_shapes
from sdrt.runtime.manifest import UNET, Manifest

# Chunking changes which rows a GEMM sees at once, not the arithmetic of a row: fp32 rounding at most.
FP32_ATOL = 1e-5
REFERENCE_ATOL = 1e-12  # numpy in float64: the chunked and the whole reference
HEADS, HEAD_DIM = 2, 8
MIN_SEQ, MAX_SEQ = 9, 50  # the hand-built model's query and key lengths
MIB = 2**20


def _attention_model(bias: np.ndarray | None = None, **attrs) -> onnx.ModelProto:
    """One Attention node over q, k, v [batch, HEADS, seq, HEAD_DIM]; with `bias`, q + bias (an initializer)."""
    dims = {x: ["batch", HEADS, f"{x}_seq", HEAD_DIM] for x in ("q", "kv")}
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, dims["q"]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, dims["kv"]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, dims["kv"])]
    nodes, query, inits = [], "q", []
    if bias is not None:
        inits = [numpy_helper.from_array(bias, "bias")]
        nodes.append(helper.make_node("Add", ["q", "bias"], ["q_biased"], name="add_bias"))
        query = "q_biased"
    nodes.append(helper.make_node("Attention", [query, "k", "v"], ["y"], name="attn", **attrs))
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                         dims["q"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _shapes(batch: int, q_seq: int, kv_seq: int) -> dict[str, list[int]]:
    return {"q": [batch, HEADS, q_seq, HEAD_DIM], "k": [batch, HEADS, kv_seq, HEAD_DIM],
            "v": [batch, HEADS, kv_seq, HEAD_DIM]}


def _feeds(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def _run(model: onnx.ModelProto | str, feeds: dict) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 6])
def test_chunked_reference_equals_the_whole(chunks):
    rng = np.random.default_rng(chunks)
    q, k, v = (rng.standard_normal((2, HEADS, seq, HEAD_DIM)) for seq in (23, 17, 17))
    assert len(split_sizes(23, chunks)) == chunks
    np.testing.assert_allclose(chunked_attention_reference(q, k, v, chunks), attention_reference(q, k, v),
                               rtol=0, atol=REFERENCE_ATOL)


def test_split_sizes_match_onnxruntime_and_the_cap_keeps_chunks_non_empty():
    for seq, chunks in [(10, 4), (23, 5), (16, 4), (50, 3)]:
        outs = [f"y{i}" for i in range(chunks)]
        graph = helper.make_graph([helper.make_node("Split", ["x"], outs, axis=0, num_outputs=chunks)], "split",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": np.zeros(seq, np.float32)})
        assert [len(g) for g in got] == split_sizes(seq, chunks)
    for min_seq in range(1, 200):
        n = max_chunks(min_seq)
        for seq in range(min_seq, min_seq + 300):
            split_sizes(seq, n)  # raises on an empty or negative last chunk
        with pytest.raises(ValueError):  # one more chunk empties the last one at seq = n^2 >= min_seq
            split_sizes(n * n, n + 1)


@pytest.mark.parametrize("q_seq,kv_seq", [(MIN_SEQ, MIN_SEQ), (10, 13), (11, MAX_SEQ), (37, 37), (MAX_SEQ, MAX_SEQ)])
def test_parity_with_the_unchunked_graph_and_the_reference(q_seq, kv_seq):
    model = _attention_model()
    budget = 14_000  # 17 query rows of batch 2 against 50 keys: 3 chunks (also the cap for MIN_SEQ = 9)
    chunked, report = chunk_attention(model, _shapes(1, MIN_SEQ, MIN_SEQ), _shapes(2, MAX_SEQ, MAX_SEQ), budget)
    assert [(c.name, c.chunks, c.seq_min, c.seq_max) for c in report.rewritten] == [("attn", 3, MIN_SEQ, MAX_SEQ)]
    assert report.largest_before == 2 * HEADS * MAX_SEQ * MAX_SEQ * SCORE_ITEMSIZE
    assert report.largest_after == 2 * HEADS * 17 * MAX_SEQ * SCORE_ITEMSIZE <= budget
    assert (_op_count(chunked, "Split"), _op_count(chunked, "Attention"), _op_count(chunked, "Concat")) == (1, 3, 1)
    feeds = _feeds(_shapes(2, q_seq, kv_seq), seed=q_seq)
    whole, parts = _run(model, feeds), _run(chunked, feeds)
    assert parts.shape == (2, HEADS, q_seq, HEAD_DIM)
    assert np.abs(parts - whole).max() <= FP32_ATOL
    q, k, v = (feeds[x].astype(np.float64) for x in "qkv")
    assert np.abs(parts - chunked_attention_reference(q, k, v, 3)).max() <= FP32_ATOL
    assert np.abs(whole - attention_reference(q, k, v)).max() <= FP32_ATOL


@pytest.mark.parametrize("budget,chunks", [(6800, 3), (6799, 4)])
def test_the_fewest_chunks_whose_largest_fits(budget, chunks):
    """50 rows of 400 score bytes: 3 chunks are 17 rows (6800 bytes); ceil(20000 / 6799) = 3 would not fit."""
    _, report = chunk_attention(_attention_model(), _shapes(1, 16, MAX_SEQ), _shapes(1, MAX_SEQ, MAX_SEQ), budget)
    (node,) = report.rewritten
    assert (node.chunks, node.bytes_before) == (chunks, MAX_SEQ * 400)
    assert node.bytes_after == 400 * split_sizes(MAX_SEQ, chunks)[0] <= budget


def test_below_the_min_shapes_a_chunk_can_be_empty_and_onnxruntime_refuses_it():
    """Why the chunk count is capped by the smallest query length: 4 chunks of 9 rows are 3, 3, 3, 0."""
    chunked, report = chunk_attention(_attention_model(), _shapes(1, 16, 16), _shapes(1, 64, 64), budget_bytes=1)
    assert report.rewritten[0].chunks == max_chunks(16) == 4
    assert report.over_budget == ("attn",)  # capped: a chunk of 16 rows still exceeds 1 byte
    _run(chunked, _feeds(_shapes(1, 16, 16)))
    with pytest.raises(Exception, match="Q sequence length must be greater than 0"):
        _run(chunked, _feeds(_shapes(1, 9, 16)))


def test_budget_above_everything_leaves_the_model_unchanged():
    model = _attention_model()
    out, report = chunk_attention(model, _shapes(1, 1, 1), _shapes(2, MAX_SEQ, MAX_SEQ), budget_bytes=1 << 40)
    assert not report.changed and report.within_budget == ("attn",) and report.skipped == ()
    assert report.largest_after == report.largest_before
    assert out.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("case,reason", [("causal", "is_causal"), ("unresolved", "did not resolve")])
def test_nodes_it_cannot_chunk_are_left_alone_and_named(case, reason):
    if case == "causal":
        model = _attention_model(is_causal=1)
    else:  # q from an op onnx cannot infer: its sequence length stays unknown
        model = _attention_model()
        model.graph.node.insert(0, helper.make_node("Mystery", ["q"], ["q_unknown"], domain="example"))
        model.graph.node[1].input[0] = "q_unknown"
        model.opset_import.append(helper.make_opsetid("example", 1))
    out, report = chunk_attention(model, _shapes(1, MIN_SEQ, MIN_SEQ), _shapes(2, MAX_SEQ, MAX_SEQ), 1000)
    assert not report.changed and [name for name, _ in report.skipped] == ["attn"]
    assert reason in report.skipped[0][1]
    assert out.SerializeToString() == model.SerializeToString()


def test_bad_input_shapes_are_refused_by_name():
    model = _attention_model()
    with pytest.raises(ValueError, match="missing \\['v'\\]"):
        static_shapes(model, {"q": [1, 2, 3, 8], "k": [1, 2, 3, 8]})
    with pytest.raises(ValueError, match="input q: .* fixed dim 8"):
        static_shapes(model, {**_shapes(1, 3, 3), "q": [1, 2, 3, 4]})


def test_external_weights_stay_external_and_the_result_runs_beside_them(tmp_path):
    bias = np.linspace(-1, 1, HEAD_DIM, dtype=np.float32)
    onnx.save(_attention_model(bias), tmp_path / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    model = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    before = model.SerializeToString()
    chunked, report = chunk_attention(model, _shapes(1, MIN_SEQ, MIN_SEQ), _shapes(1, MAX_SEQ, MAX_SEQ), 5000)
    assert model.SerializeToString() == before
    assert report.rewritten[0].chunks == 3
    (init,) = chunked.graph.initializer
    assert init.data_location == TensorProto.EXTERNAL and not init.raw_data
    assert {e.key: e.value for e in init.external_data}["location"] == "model.onnx.data"
    onnx.save(chunked, tmp_path / "chunked.onnx")
    feeds = _feeds(_shapes(1, 20, 31))
    assert np.abs(_run(str(tmp_path / "chunked.onnx"), feeds) - _run(str(tmp_path / "model.onnx"), feeds)).max() \
        <= FP32_ATOL


def test_shapes_for_reads_the_manifest_axes(tiny_engine):
    unet = Manifest.load(tiny_engine).components[UNET]
    low, high = shapes_for(unet.inputs, unet.axes, "min"), shapes_for(unet.inputs, unet.axes, "max")
    batch, height = unet.axes["batch"], unet.axes["latent_height"]
    assert low["sample"][0] == batch.min and high["sample"][0] == batch.max
    assert low["sample"][2] == height.min and high["sample"][2] == height.max
    assert high["encoder_hidden_states"][1:] == list(unet.inputs[2].shape[1:])


@pytest.fixture(scope="module")
def tiny_unet(tiny_engine):
    unet = Manifest.load(tiny_engine).components[UNET]
    path = tiny_engine / unet.artifact().file
    return path, onnx.load(path), shapes_for(unet.inputs, unet.axes, "min"), shapes_for(unet.inputs, unet.axes, "max")


def test_static_shapes_resolve_every_attention_of_the_tiny_unet(tiny_unet):
    """GroupNormalization and the exporter's Shape arithmetic defeat plain onnx inference (kernels/shapes.py)."""
    _, model, low, high = tiny_unet
    for shapes in (low, high):
        sizes = attention_score_bytes(model, shapes)
        assert len(sizes) == _op_count(model, "Attention") > 0 and None not in sizes
        assert static_shapes(model, shapes)[model.graph.output[0].name] == tuple(shapes["sample"])


@pytest.mark.parametrize("budget", [16 * MIB, 24 * MIB])
def test_tiny_unet_fits_the_budget_and_keeps_its_output(tiny_unet, budget):
    path, model, low, high = tiny_unet
    before = model.SerializeToString()
    sizes = attention_score_bytes(model, high)
    chunked, report = chunk_attention(model, low, high, budget)
    assert model.SerializeToString() == before
    # Structure: a rewritten node becomes exactly `chunks` Attention nodes; nodes that fit stay as they were.
    assert report.rewritten and report.within_budget and not report.skipped and not report.over_budget
    assert _op_count(chunked, "Attention") == sum(c.chunks for c in report.rewritten) + len(report.within_budget)
    assert report.largest_before == max(sizes) > budget
    after = attention_score_bytes(chunked, high)
    assert None not in after and max(after) == report.largest_after <= budget
    originals = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(originals) == len(report.within_budget) + len(report.rewritten)
    score = {n.name: size for n, size in zip(originals, sizes)}
    nodes = {n.name: n for n in chunked.graph.node}
    for n in originals:
        assert (n.name in report.within_budget) == (score[n.name] <= budget)
        assert (nodes.get(n.name) == n) == (n.name in report.within_budget)  # untouched, or gone
    # Parity: the same UNet output at the smallest inputs, uneven chunks and the largest latent.
    for batch, h, w in [(1, 4, 4), (2, 8, 10), (2, 16, 16)]:
        context = [batch, *high["encoder_hidden_states"][1:]]
        feeds = _feeds({"sample": [batch, 4, h, w], "encoder_hidden_states": context}, seed=h * w)
        feeds["timestep"] = np.full(batch, 500.0, dtype=np.float32)
        whole, parts = _run(str(path), feeds), _run(chunked, feeds)
        assert np.abs(parts - whole).max() <= FP32_ATOL * max(1.0, float(np.abs(whole).max()))



def test_ort_backend_chunks_at_load_and_keys_its_cache(tiny_engine, tmp_path):
    """The CPU backend applies the pass when it loads a graph: same outputs, a cache named by the budget that holds
    the chunked graph, and a second load that reads that cache."""
    import shutil

    from sdrt.runtime.backend import OrtBackend
    from sdrt.runtime.manifest import Manifest

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine, ignore=shutil.ignore_patterns("*.ort-*"))
    manifest = Manifest.load(engine)
    rng = np.random.default_rng(0)
    h = w = manifest.components["unet"].axes["latent_height"].max
    feeds = {"sample": rng.standard_normal((2, 4, h, w), dtype=np.float32),
             "timestep": np.full(2, 300, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    (whole,) = OrtBackend(engine, manifest, attention_budget=None).run("unet", feeds)
    budget = 1024  # bytes: the tiny UNet's self-attentions (up to 256 tokens) are far over it
    (chunked,) = OrtBackend(engine, manifest, attention_budget=budget).run("unet", feeds)
    assert np.abs(chunked - whole).max() <= FP32_ATOL
    caches = sorted(p.name for p in (engine / "unet").glob("model.ort-*.onnx"))
    assert len(caches) == 2 and any(name.endswith("-attn1024b.onnx") for name in caches)
    cached = onnx.load(str(next((engine / "unet").glob("model.ort-*-attn1024b.onnx"))), load_external_data=False)
    original = onnx.load(str(engine / "unet" / "model.onnx"), load_external_data=False)
    count = lambda m: sum(n.op_type == "Attention" for n in m.graph.node)  # noqa: E731
    assert count(cached) > count(original)
    (again,) = OrtBackend(engine, manifest, attention_budget=budget).run("unet", feeds)
    assert np.array_equal(again, chunked)
