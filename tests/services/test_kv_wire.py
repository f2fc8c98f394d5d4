"""The prefill -> decode KV wire format per KV format: PullKv's chunks (services/prefill/servicer.py)
placed back by the decode side (services/decode/kv_transfer.py) give the exported pools byte for byte.

The end-to-end pull over gRPC runs in tests/services/test_services.py (fp32), in
tests/services/test_saq_handoff.py (SAQ, in process) and, per format, in benchmarks/kv_formats_cpu.py;
here every format's pool tensors (codes and scales for int8/int4; SAQ's records and slot) go through
the same two functions, with chunks that split rows across messages.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.kv_formats import SaqFormat
from runtime.errors import InvalidRequestError
from runtime.kv_cache import pool_tensors
from services.common.messages import kv_wire_rows
from services.decode.kv_transfer import _place
from services.prefill.servicer import _chunks

WIDTH, HEAD_DIM, LAYERS, TOKENS = 192, 64, 3, 37


def _exported(kv_format: str) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(LAYERS):
        tensors = []
        for t in pool_tensors(kv_format, WIDTH, HEAD_DIM):
            if np.issubdtype(t.dtype, np.integer):
                info = np.iinfo(t.dtype)
                tensors.append(
                    rng.integers(info.min, info.max, (TOKENS, t.width), endpoint=True).astype(t.dtype)
                )
            else:
                tensors.append(rng.standard_normal((TOKENS, t.width)).astype(t.dtype))
        layers.append(tuple(tensors))
    return layers


@pytest.mark.parametrize("kv_format", ["fp32", "fp16", "int8", "int4"])
def test_chunks_round_trip_every_pool_tensor(kv_format):
    exported = _exported(kv_format)
    pool = pool_tensors(kv_format, WIDTH, HEAD_DIM)
    max_bytes = 1000  # a few rows per message, so every tensor spans several chunks
    messages = [
        chunk
        for layer, tensors in enumerate(exported)
        for part, array in enumerate(tensors)
        for chunk in _chunks(layer, part, array, max_bytes)
    ]
    assert all(len(m.data) <= max(max_bytes, max(t.width * t.dtype.itemsize for t in pool)) for m in messages)
    payload = sum(len(m.data) for m in messages)
    assert payload == TOKENS * LAYERS * sum(t.width * t.dtype.itemsize for t in pool)
    layers = [tuple(np.empty((TOKENS, t.width), t.dtype) for t in pool) for _ in range(LAYERS)]
    filled = np.zeros((LAYERS, len(pool)), np.int64)
    for message in reversed(messages):  # order does not matter
        _place(message, layers, filled)
    assert (filled == TOKENS).all()
    for got, want in zip(layers, exported):
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w)


def test_malformed_chunks_are_refused():
    exported = _exported("int4")
    pool = pool_tensors("int4", WIDTH, HEAD_DIM)
    layers = [tuple(np.empty((TOKENS, t.width), t.dtype) for t in pool) for _ in range(LAYERS)]
    filled = np.zeros((LAYERS, len(pool)), np.int64)
    good = next(_chunks(0, 2, exported[0][2], 1 << 20))
    bad_part = type(good)(layer=0, part=4, token_start=0, token_count=1, data=good.data[:12])
    with pytest.raises(InvalidRequestError, match="does not fit"):
        _place(bad_part, layers, filled)
    short = type(good)(layer=0, part=2, token_start=0, token_count=TOKENS, data=good.data[:-2])
    with pytest.raises(InvalidRequestError, match="malformed"):
        _place(short, layers, filled)


def test_saq_records_and_slot_travel_in_chunks_within_the_limit():
    """SAQ's per-block records and the slot's bytes in use (one row) are opaque bytes, a row larger than the
    smallest chunk limit (4 KiB): they travel as byte rows, every message within the limit, and come back
    byte for byte."""
    saq = "8:1,4:4,2;stage=64;v_group=32"
    fmt = SaqFormat.parse(saq, WIDTH)
    pool = pool_tensors("saq", WIDTH, HEAD_DIM, saq)
    tokens = 7 * 64 + TOKENS  # stages 0 and 1 at the bottom, 2..6 in the rings, 37 tokens open
    shapes = [
        (len(fmt.bottom_stages(tokens)), fmt.block_bytes),
        (1, fmt.handoff_bytes(tokens) - 2 * fmt.block_bytes),
    ]
    assert shapes[0][0] == 2 and min(width for _, width in shapes) > 4096
    rng = np.random.default_rng(1)
    exported = [tuple(rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes) for _ in range(LAYERS)]
    max_bytes = 4096
    messages = [
        chunk
        for layer, tensors in enumerate(exported)
        for part, (t, array) in enumerate(zip(pool, tensors))
        for chunk in _chunks(layer, part, kv_wire_rows(array, t.per), max_bytes)
    ]
    assert max(len(m.data) for m in messages) == max_bytes
    assert sum(len(m.data) for m in messages) == LAYERS * fmt.handoff_bytes(tokens)
    layers = [tuple(np.empty(shape, np.uint8) for shape in shapes) for _ in range(LAYERS)]
    wire = [tuple(kv_wire_rows(a, t.per) for a, t in zip(layer, pool)) for layer in layers]
    filled = np.zeros((LAYERS, len(pool)), np.int64)
    for message in reversed(messages):
        _place(message, wire, filled)
    assert (filled == [[len(w) for w in layer] for layer in wire]).all()
    for got, want in zip(layers, exported):
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
    short = type(messages[0])(layer=0, part=1, token_start=shapes[1][1] - 10, token_count=20, data=bytes(20))
    with pytest.raises(InvalidRequestError, match="malformed"):
        _place(short, wire, filled)  # past the end of the slot row
