"""Memory-bounded attention: split each large `Attention` node's queries into chunks (a graph pass), and the
numpy references it matches.

Why: ONNX Runtime's CPU kernel for the opset-23 `Attention` op materializes the whole score matrix
softmax(Q K^T * scale), [batch, heads, Sq, Skv] in fp32, before multiplying by V. SD 1.5 at 1024x1024 (latent
128x128: Sq = Skv = 16384, 8 heads, batch 2 under classifier-free guidance) needs 17 GiB for one self-attention.
Softmax runs along the key axis only, so query rows are independent: splitting Q along Sq into N pieces,
attending each to the same K and V and concatenating the results computes the same numbers, with a score
matrix N times smaller at a time (ORT runs the pieces one after the other and reuses the freed buffer).
Measured with ORT 1.32 on CPU, one 8-head 4096-token self-attention (512 MiB of scores): peak RSS growth
534 MiB whole, 138 MiB in 8 chunks, and no slower (0.28 s whole, 0.23 s chunked, 2 threads).

The trade: peak score memory / N for N kernel launches instead of one, a copy of Q (Split) and of the output
(Concat), and smaller GEMMs that keep the cores a little less busy; each piece reads all of K and V again.
The pass therefore chunks only nodes whose largest score matrix exceeds the budget, into the fewest chunks
that fit. Nodes under budget are untouched.

The rewrite is Split(Q, axis=2, num_outputs=N) -> N x Attention (same attributes, K, V) -> Concat(axis=2) onto
the original output name. Split's num_outputs makes chunks of ceil(Sq / N) rows, the last one smaller, and that
last one can be empty or negative: ORT's Split accepts an empty chunk but refuses a negative one ("Split sizes
would produce a negative final split"), and its Attention refuses Sq = 0 ("Q sequence length must be greater
than 0"). Every chunk is non-empty for every Sq >= m exactly when (N - 1)^2 < m (Sq = (N - 1)^2 itself leaves
the last chunk empty), so N is capped at `max_chunks(smallest Sq)`, not at the smallest Sq.

Nodes with a mask, past key/value, extra outputs or `is_causal` are left alone (a causal mask would need a
per-chunk offset), as are nodes whose shapes inference cannot resolve; the report says which and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .shapes import static_shapes

SCORE_ITEMSIZE = 4  # bytes per score: ORT's CPU kernel keeps the fp32 graphs' score matrix in fp32
SEQ_AXIS = 2  # Q, K, V are [batch, heads, seq, head_dim]


@dataclass(frozen=True)
class ChunkedNode:
    """One rewritten Attention node: its query length range and largest score matrix before and after."""

    name: str
    chunks: int
    seq_min: int  # query length at the smallest inputs
    seq_max: int  # and at the largest
    bytes_before: int  # B * H * Sq * Skv * SCORE_ITEMSIZE at the largest inputs
    bytes_after: int  # the same for the largest chunk, ceil(Sq / chunks) rows


@dataclass(frozen=True)
class ChunkReport:
    budget_bytes: int
    rewritten: tuple[ChunkedNode, ...]
    within_budget: tuple[str, ...]  # Attention nodes left as they are because they fit
    skipped: tuple[tuple[str, str], ...]  # (node, reason): over budget or unknown, left as they are
    largest_before: int  # the largest score matrix of any resolved Attention node, bytes
    largest_after: int

    @property
    def changed(self) -> bool:
        return bool(self.rewritten)

    @property
    def over_budget(self) -> tuple[str, ...]:
        """Rewritten nodes whose chunks still exceed the budget (the chunk count was capped)."""
        return tuple(c.name for c in self.rewritten if c.bytes_after > self.budget_bytes)


def split_sizes(seq: int, chunks: int) -> list[int]:
    """The chunk lengths of ONNX Split(num_outputs=chunks) along an axis of length `seq`."""
    size = -(-seq // chunks)
    sizes = [size] * (chunks - 1) + [seq - size * (chunks - 1)]
    if sizes[-1] <= 0:
        raise ValueError(f"{chunks} chunks of {seq} rows leave the last one with {sizes[-1]}")
    return sizes


def max_chunks(min_seq: int) -> int:
    """The largest chunk count whose chunks are all non-empty for every query length >= min_seq."""
    return 1 + math.isqrt(min_seq - 1) if min_seq > 0 else 1


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None) -> np.ndarray:
    """softmax(q k^T * scale) v over [batch, heads, seq, head_dim] (ONNX Attention-23 without mask or softcap);
    computed in float64, returned in q's dtype. scale defaults to 1/sqrt(head_dim)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.matmul(p, v.astype(np.float64)).astype(q.dtype)


def chunked_attention_reference(q, k, v, chunks: int, scale: float | None = None) -> np.ndarray:
    """`attention_reference` on the query chunks the graph pass makes (Split num_outputs semantics), joined."""
    bounds = np.cumsum(split_sizes(q.shape[SEQ_AXIS], chunks))[:-1]
    parts = np.split(q, bounds, axis=SEQ_AXIS)
    return np.concatenate([attention_reference(p, k, v, scale) for p in parts], axis=SEQ_AXIS)


def attention_score_bytes(model: onnx.ModelProto, input_shapes: Mapping[str, list[int]]) -> list[int | None]:
    """The score matrix size of each top-level Attention node, in graph order, at `input_shapes` (None: the
    node's Q or K shape did not resolve, or is not 4-D)."""
    shapes = static_shapes(model, input_shapes)
    return [_score_bytes(n, shapes) for n in model.graph.node if _is_attention(n)]


def chunk_attention(model: onnx.ModelProto, min_shapes: Mapping[str, list[int]],
                    max_shapes: Mapping[str, list[int]], budget_bytes: int) -> tuple[onnx.ModelProto, ChunkReport]:
    """Split every Attention node whose score matrix can exceed `budget_bytes` into query chunks that fit.

    `min_shapes` and `max_shapes` give each fed graph input (not the initializers) its concrete shape at the
    smallest and the largest inputs the model will run at, {input name: [dims]}: for an engine dir component,
    `shapes_for(component.inputs, component.axes, "min")` and `... "max")` (kernels/shapes.py). The largest
    shapes size the chunks, the smallest cap their count (see the module docstring).

    Returns a new model and what changed; `model` is not modified. Initializers are copied as they are: a model
    loaded with `load_external_data=False` keeps its external-data references (location relative to the
    original file): save the result next to the weights file, or elsewhere and give ONNX Runtime the weights'
    folder in the session config entry "session.model_external_initializers_file_folder_path" (ORT refuses
    an external-data path outside the model's own folder otherwise).
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    at_max, at_min = static_shapes(model, max_shapes), static_shapes(model, min_shapes)
    plans: dict[int, ChunkedNode] = {}
    within, skipped, before, after = [], [], [], []
    for i, node in enumerate(model.graph.node):
        if not _is_attention(node):
            continue
        name = node.name or f"Attention#{i}"
        big, small = _score_bytes(node, at_max), _score_bytes(node, at_min)
        if big is not None:
            before.append(big)
        if big is not None and big <= budget_bytes:
            within.append(name)
            after.append(big)
            continue
        reason = _unsupported(node)
        if reason is None and (big is None or small is None):
            reason = "shape inference did not resolve its 4-D Q and K shapes"
        if reason:
            skipped.append((name, reason))
            after.extend([big] if big is not None else [])
            continue
        seq_max, seq_min = at_max[node.input[0]][SEQ_AXIS], at_min[node.input[0]][SEQ_AXIS]
        row_bytes = big // seq_max
        chunks = min(-(-seq_max // max(budget_bytes // row_bytes, 1)), max_chunks(seq_min))
        if chunks < 2:
            skipped.append((name, f"over budget, but its smallest query length {seq_min} cannot be split"))
            after.append(big)
            continue
        plans[i] = ChunkedNode(name, chunks, seq_min, seq_max, big, row_bytes * -(-seq_max // chunks))
        after.append(plans[i].bytes_after)
    report = ChunkReport(budget_bytes, tuple(plans.values()), tuple(within), tuple(skipped),
                         max(before, default=0), max(after, default=0))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if plans:
        _rewrite(out.graph, plans)
    return out, report


def _is_attention(node: onnx.NodeProto) -> bool:
    return node.op_type == "Attention" and node.domain in ("", "ai.onnx")


def _unsupported(node: onnx.NodeProto) -> str | None:
    if any(node.input[3:]):
        return "has a mask or past key/value inputs"
    if any(node.output[1:]):
        return "returns present key/value or scores"
    if any(a.name == "is_causal" and a.i for a in node.attribute):
        return "is_causal: query chunks would need offset masks"
    return None


def _score_bytes(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    q, k = shapes.get(node.input[0]), shapes.get(node.input[1])
    if q is None or k is None or len(q) != 4 or len(k) != 4:
        return None
    return q[0] * q[1] * q[SEQ_AXIS] * k[SEQ_AXIS] * SCORE_ITEMSIZE


def _rewrite(graph: onnx.GraphProto, plans: Mapping[int, ChunkedNode]) -> None:
    """Replace each planned node, in place in `graph` (the pass's own copy), by Split -> Attention x N -> Concat."""
    taken = {n.name for n in graph.node} | {x for n in graph.node for x in (*n.input, *n.output)}
    taken |= {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    nodes = []
    for i, node in enumerate(graph.node):
        plan = plans.get(i)
        if plan is None:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)  # graph.node is cleared below
            nodes.append(kept)
            continue
        base = node.name or f"attention_{i}"
        queries = [fresh(f"{node.input[0]}_chunk{c}") for c in range(plan.chunks)]
        results = [fresh(f"{node.output[0]}_chunk{c}") for c in range(plan.chunks)]
        nodes.append(helper.make_node("Split", [node.input[0]], queries, name=fresh(f"{base}_split"),
                                      axis=SEQ_AXIS, num_outputs=plan.chunks))
        for c, (q, y) in enumerate(zip(queries, results)):
            part = onnx.NodeProto()
            part.CopyFrom(node)
            part.input[0], part.name = q, fresh(f"{base}_chunk{c}")
            del part.output[:]
            part.output.append(y)
            nodes.append(part)
        nodes.append(helper.make_node("Concat", results, [node.output[0]], name=fresh(f"{base}_concat"),
                                      axis=SEQ_AXIS))
    del graph.node[:]
    graph.node.extend(nodes)
