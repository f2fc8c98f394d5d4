"""The native CPU kernel of fastattention::FlashAttentionSaq (kernels/csrc/saq_cpu.cc) against its spec,
kernels/kv_saq.paged_attention_saq_ref, through onnxruntime with the library registered.

A `Batch` holds a session of one FlashAttentionSaq node and the two pools (random bytes to start with), bound
as input and output at once (IO binding: the kernel updates them in place across calls, as the runtime runs
it). Every step runs the spec on a copy of the pools as they were before the call, so each call is checked on
its own:
- outputs of real (non-padding) queries: within 1e-4 for fp32, one fp16 step (2^-10 relative) + 1e-4 for fp16;
- pools: byte for byte where no stair clips. Where a stair clips, the kernel's sum of squared errors adds in
  another order than torch's, so a near-tie may pick another clipping ratio for a group (the spec's docstring
  allows it): there, the pools may differ in a few groups' bytes (at most 0.2% of them), and the values they
  decode to must stay near the spec's.

The module fixture builds the library if needed; without g++/npm the tests skip (fail when CI is set).
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

from kernels import attention_cpu
from kernels.kv_formats import SaqFormat
from kernels.kv_saq import _SlotView, paged_attention_saq_ref

INPUTS = "q k v kv_pool kv_slots block_table slot_mapping past_lens total_lens seq_slots".split()
OUTPUTS = ["o", "kv_pool_out", "kv_slots_out"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
FORMATS = [
    "8:1,4:2,2;stage=8;v_group=16",
    "8:1,4:2,2;stage=8;v_group=16;sink=1;clip=2",
    "4;stage=16;v_group=32",
    "8:2,2;stage=8;sink=2;clip=4",
    "8:1,4:2,2;stage=8;v_group=16;sink_tokens=1",  # token sinks (stage 0 on the bottom stair at last)
    "8:1,4:2,2;stage=8;v_group=16;sink=1;clip=2;sink_tokens=3",  # token sinks inside a sink stage
    "4;stage=16;v_group=32;sink_tokens=3",  # one stair: stage 0 paged from its close on
]


@pytest.fixture(scope="module", autouse=True)
def library():
    try:
        return attention_cpu.build_library()
    except attention_cpu.BuildError as error:
        if os.environ.get("CI"):
            pytest.fail(f"the CPU kernel library could not be built: {error}")
        pytest.skip(f"the CPU kernel library could not be built: {error}")


def saq_model(elem: int, *, num_heads: int, num_kv_heads: int, head_dim: int, spec: str, causal: bool = True,
              sliding_window: int = 0, kv_format: str = "saq"):  # fmt: skip
    """A model holding one FlashAttentionSaq node (no function body: only the kernel runs it)."""
    attrs = dict(
        num_heads=num_heads, num_kv_heads=num_kv_heads, scale=float(head_dim**-0.5), causal=int(causal)
    )
    attrs.update(sliding_window=sliding_window, kv_format=kv_format, saq=spec)
    node = helper.make_node("FlashAttentionSaq", INPUTS, OUTPUTS, domain="fastattention", **attrs)
    types = dict(q=elem, k=elem, v=elem, kv_pool=TensorProto.UINT8, kv_slots=TensorProto.UINT8)
    types.update(slot_mapping=TensorProto.INT64)
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.INT32), None) for n in INPUTS]
    outputs = [helper.make_tensor_value_info("o", elem, None)]
    outputs += [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in OUTPUTS[1:]]
    graph = helper.make_graph([node], "flash_attention_saq", inputs, outputs)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("fastattention", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def make_session(model, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    assert attention_cpu.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class Batch:
    """Rows of sequences stepped through one FlashAttentionSaq session, pools updated in place."""

    def __init__(self, spec: str, *, dtype=torch.float32, num_heads=4, num_kv_heads=2, head_dim=32, rows=3,
                 max_stages=12, threads=1, causal=True, sliding_window=0, seed=0):  # fmt: skip
        self.width = num_kv_heads * head_dim
        self.fmt = SaqFormat.parse(spec, self.width)
        self.dtype, self.num_heads, self.num_kv_heads = dtype, num_heads, num_kv_heads
        self.head_dim, self.causal, self.sliding_window = head_dim, causal, sliding_window
        self.g = torch.Generator().manual_seed(seed)
        num_blocks = 1 + rows * max_stages  # block 0 and slot 0: the scratch of padding rows
        self.pool = self.random_bytes(num_blocks, self.fmt.block_bytes)
        self.slots = self.random_bytes(rows + 1, self.fmt.slot_bytes)
        order = (torch.randperm(num_blocks - 1, generator=self.g) + 1).view(rows, max_stages)
        self.table = order.to(torch.int32)  # any blocks: the table names them
        self.seq_slots = torch.randperm(rows, generator=self.g).to(torch.int32) + 1
        self.lens = [0] * rows
        self.channel_scale = torch.linspace(0.2, 3.0, self.width)  # K channels of different ranges
        elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
        model = saq_model(elem, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, spec=spec,
                          causal=causal, sliding_window=sliding_window)  # fmt: skip
        self.session = make_session(model, threads)
        self.pool_value = ort.OrtValue.ortvalue_from_numpy(self.pool)
        self.slots_value = ort.OrtValue.ortvalue_from_numpy(self.slots)

    def random_bytes(self, *shape: int) -> np.ndarray:
        return torch.randint(0, 256, shape, generator=self.g, dtype=torch.uint8).numpy()

    def inputs(self, new: list[int | None]) -> dict[str, torch.Tensor]:
        """Step inputs: new[b] tokens for row b (0: idle, None: a padding row on slot 0 / block 0)."""
        B, S = len(new), max(n or 0 for n in new) or 1
        randn = lambda *shape: torch.randn(*shape, generator=self.g)  # noqa: E731
        padding = [n is None for n in new]
        past = torch.tensor([0 if pad else self.lens[b] for b, pad in enumerate(padding)], dtype=torch.int32)
        count = torch.tensor([n or 0 for n in new], dtype=torch.int32)
        mask = torch.tensor(padding)
        return dict(
            q=randn(B, S, self.num_heads * self.head_dim).to(self.dtype),
            k=(randn(B, S, self.width) * self.channel_scale + 0.3).to(self.dtype),
            v=randn(B, S, self.width).to(self.dtype),
            block_table=torch.where(mask[:, None], 0, self.table[:B]),
            slot_mapping=torch.zeros(B, S, dtype=torch.int64),
            past_lens=past,
            total_lens=past + count,
            seq_slots=torch.where(mask, 0, self.seq_slots[:B]),
        )

    def reference(self, x: dict):
        return paged_attention_saq_ref(
            x["q"], x["k"], x["v"], torch.from_numpy(self.pool.copy()), torch.from_numpy(self.slots.copy()),
            x["block_table"], x["past_lens"], x["total_lens"], x["seq_slots"], num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, scale=self.head_dim**-0.5, fmt=self.fmt, causal=self.causal,
            sliding_window=self.sliding_window,
        )  # fmt: skip

    def run(self, x: dict) -> torch.Tensor:
        binding = self.session.io_binding()
        for name in INPUTS:
            if name == "kv_pool":
                binding.bind_ortvalue_input(name, self.pool_value)
            elif name == "kv_slots":
                binding.bind_ortvalue_input(name, self.slots_value)
            else:
                binding.bind_cpu_input(name, x[name].numpy())
        binding.bind_output("o", "cpu")
        binding.bind_ortvalue_output("kv_pool_out", self.pool_value)
        binding.bind_ortvalue_output("kv_slots_out", self.slots_value)
        self.session.run_with_iobinding(binding)
        o, pool, slots = binding.get_outputs()
        assert pool.data_ptr() == self.pool.ctypes.data and slots.data_ptr() == self.slots.ctypes.data
        return torch.from_numpy(o.numpy())

    def step(self, new: list[int | None]) -> None:
        """One call: the kernel's output and pools against the spec's from the same pools."""
        x = self.inputs(new)
        o_ref, pool_ref, slots_ref = self.reference(x)
        o = self.run(x)
        count = x["total_lens"] - x["past_lens"]
        for b in range(len(new)):
            n = int(count[b])
            error = (o[b, :n].float() - o_ref[b, :n].float()).abs()
            bound = 1e-4 + (2**-10 * o_ref[b, :n].float().abs() if self.dtype == torch.float16 else 0)
            assert (error <= bound).all(), f"row {b}, new tokens {new}: max|o - ref| = {error.max():.3g}"
            assert torch.count_nonzero(o[b, n:]) == 0, "padding queries output zeros"
            if new[b] is not None:
                self.lens[b] += n
        if self.fmt.clip == 0:
            assert np.array_equal(self.pool, pool_ref.numpy()), f"kv_pool differs after {new}"
            assert np.array_equal(self.slots, slots_ref.numpy()), f"kv_slots differs after {new}"
        else:
            self.check_clipped_pools(x, pool_ref, slots_ref)

    def check_clipped_pools(self, x: dict, pool_ref: torch.Tensor, slots_ref: torch.Tensor) -> None:
        """Near-ties of the clipping search aside, the kernel holds the spec's stages (module docstring)."""
        differ = int((self.pool != pool_ref.numpy()).sum() + (self.slots != slots_ref.numpy()).sum())
        assert differ <= 0.002 * (self.pool.size + self.slots.size), f"{differ} bytes differ"
        pools = (torch.from_numpy(self.pool), torch.from_numpy(self.slots))
        for b, total in enumerate(x["total_lens"].tolist()):
            where = (int(x["seq_slots"][b]), x["block_table"][b], self.fmt)
            closed = total // self.fmt.stage
            mine = _SlotView(*pools, *where).keys_values(closed, total)
            spec = _SlotView(pool_ref, slots_ref, *where).keys_values(closed, total)
            for a, e in zip(mine, spec):  # K, V [total, width]
                assert total == 0 or (a - e).abs().max() <= 0.5 * (e.amax() - e.amin()), "a stage far off"


ROW_CHUNKS = [  # new tokens per step: row 0 decodes after short chunks, row 1 prefills odd chunks, row 2 pads
    [5, 1, 1, 1, 9, 1, 1, 17, 1, 1, 23, 1, 1],
    [13, 7, 0, 1, 22, 3, 0, 1, 9, 1, 1, 2, 1],
    [None] * 13,
]


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("spec", FORMATS)
def test_steps_match_spec(spec, dtype, head_dim):
    """Token-by-token decode and odd prefill chunks in one batch, crossing several stage closes (every stair
    reached), idle steps and a padding row, pools bound in place across the calls."""
    batch = Batch(spec, dtype=dtype, head_dim=head_dim, seed=head_dim + len(spec))
    for new in zip(*ROW_CHUNKS):
        batch.step(list(new))
    upper = batch.fmt.sink + sum(count for _, count in batch.fmt.stairs)
    assert min(batch.lens[:2]) // batch.fmt.stage > upper  # stages closed and moved down to the bottom stair


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, spec",
    [
        (6, 2, 40, "8:1,4:1,2;stage=8;v_group=16"),  # D not a multiple of the SIMD width, groups across heads
        (3, 3, 24, "8:1,2;stage=16;v_group=8;clip=2"),  # MHA, V groups narrower than a vector
        (4, 2, 6, "8:1,4:1,2;stage=8;v_group=4"),  # heads that start inside a byte of 2- and 4-bit codes
        (12, 1, 32, "4:1,2;stage=8;v_group=32;sink=1"),  # a group of 12 query heads
        (6, 2, 40, "8:1,2;stage=8;v_group=20;sink_tokens=5"),  # token sinks, scalar tails
    ],
)
def test_odd_shapes(num_heads, num_kv_heads, head_dim, spec):
    """Shapes the vector kernels do not cover whole: scalar tails, V dequantized into a buffer."""
    shape = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    batch = Batch(spec, **shape, rows=2, threads=2, seed=head_dim)
    for new in [[13, 1], [1, 30], [9, 1], [1, 1], [17, 2], [1, 1]]:
        batch.step(new)


@pytest.mark.parametrize("causal, sliding_window", [(True, 5), (True, 13), (False, 0), (False, 11)])
@pytest.mark.parametrize("spec", [FORMATS[1], FORMATS[2], FORMATS[5]])
def test_sliding_window_and_full_attention(spec, causal, sliding_window):
    batch = Batch(spec, causal=causal, sliding_window=sliding_window, rows=2, seed=sliding_window + causal)
    for new in [[11, 3], [1, 20], [1, 1], [17, 1], [1, 9], [1, 1]]:
        batch.step(new)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_context_splits_keys(threads):
    """The embedded model's shape and format: a 1100-token prefill (8 stages close, the first stays as the
    sink), then decode steps whose keys split into pieces merged at the end, the last one closing a stage."""
    batch = Batch("8:1,4:7,2;stage=128;v_group=64;sink=1;clip=2", num_heads=9, num_kv_heads=3, head_dim=64,
                  rows=2, threads=threads, seed=7)  # fmt: skip
    for new in [[1100, 300], [1, 1], [1, 1], [1, 1], [48, 1], [1, 1]]:
        batch.step(new)
    assert batch.lens[0] == 9 * 128  # the last decode step closed stage 8


@pytest.mark.parametrize(
    "spec",
    [
        "8:1,2;stage=8;v_group=16;sink_tokens=7",  # every row of stage 0 but the last one a token sink
        "4:1,2;stage=16;v_group=16;sink=1;sink_tokens=3",
        "8:2,4;stage=16;sink_tokens=1;clip=4",
    ],
)
def test_token_sinks_through_the_close_of_stage_zero(spec):
    """Row 0 decodes token by token through stage 0's close (its first rows move to the token sinks' rows),
    row 1 closes it inside a prefill chunk that starts among the token sinks; the later steps read positions
    < sink_tokens from the sink rows, the rest of stage 0 from its record, as it steps down the stairs."""
    batch = Batch(spec, rows=2, max_stages=8, seed=len(spec))
    stage = batch.fmt.stage
    steps = [[1, 2]] + [[1, 0]] * (stage - 2) + [[1, stage + 3], [1, 1], [2 * stage + 5, 1], [1, 3 * stage]]
    for new in steps + [[1, 1]] * 3:
        batch.step(new)
    assert min(batch.lens) // stage > batch.fmt.sink + batch.fmt.upper_stages  # stage 0 left the top stair


def test_output_buffers_apart_from_the_inputs_get_a_copy():
    """session.run: ORT gives the outputs their own buffers; the kernel copies the pools there first and
    leaves the inputs alone."""
    batch = Batch(FORMATS[0], rows=2, seed=3)
    batch.step([20, 3])
    x = batch.inputs([9, 1])
    feeds = {name: x[name].numpy() for name in INPUTS if name not in ("kv_pool", "kv_slots")}
    pool, slots = batch.pool.copy(), batch.slots.copy()
    o, pool_out, slots_out = batch.session.run(None, feeds | {"kv_pool": pool, "kv_slots": slots})
    o_ref, pool_ref, slots_ref = batch.reference(x)
    assert np.array_equal(pool, batch.pool) and np.array_equal(slots, batch.slots)
    assert np.array_equal(pool_out, pool_ref.numpy()) and np.array_equal(slots_out, slots_ref.numpy())
    assert (torch.from_numpy(o)[0, :9] - o_ref[0, :9]).abs().max() <= 1e-4


def _feeds(batch: Batch, x: dict, **override) -> dict[str, np.ndarray]:
    feeds = {name: x[name].numpy() for name in INPUTS if name not in ("kv_pool", "kv_slots")}
    return feeds | {"kv_pool": batch.pool, "kv_slots": batch.slots} | override


def _block_bytes(b: Batch, x: dict):
    bad = b.fmt.block_bytes + 2
    return dict(kv_pool=np.zeros((4, bad), np.uint8)), (
        rf"kv_pool shape \[4, {bad}\]: blocks of {bad} bytes, but the SAQ format "
        rf"'8:1,4:2,2;stage=8;v_group=16' over W = num_kv_heads \* head_dim = 64 channels needs "
        rf"block_bytes = {b.fmt.block_bytes}"
    )


def _slot_bytes(b: Batch, x: dict):
    bad = b.fmt.slot_bytes - 1
    message = rf"slots of {bad} bytes, .* needs slot_bytes = {b.fmt.slot_bytes}"
    return dict(kv_slots=np.zeros((3, bad), np.uint8)), message


def _slot_index(b: Batch, x: dict):
    message = r"seq_slots\[1\] = 3 is out of range \[0, 3\) \(kv_slots rows\)"
    return dict(seq_slots=np.array([1, 3], np.int32)), message


def _shared_slot(b: Batch, x: dict):
    return dict(seq_slots=np.array([2, 2], np.int32)), r"seq_slots\[1\] = 2 is also row 0's slot"


def _block_id(b: Batch, x: dict):
    table = x["block_table"].numpy().copy()
    table[0, 1] = 1000  # stage 1 of row 0 (40 tokens: 5 stages, 0 and 1 on the bottom stair)
    return dict(block_table=table), r"block_table\[0, 1\] = 1000 is out of range \[0, 25\) \(kv_pool blocks\)"


def _narrow_table(b: Batch, x: dict):
    return dict(block_table=x["block_table"].numpy()[:, :1].copy()), (
        r"block_table too narrow: total_lens\[0\] = 40 puts stage 1 on the bottom stair"
    )


def _total_lens(b: Batch, x: dict):
    return dict(total_lens=np.array([40, 50], np.int32)), (
        r"total_lens\[1\] = 50 is not past_lens \+ new tokens: it must lie in \[0, 40\]"
    )


BAD_INPUTS = [_block_bytes, _slot_bytes, _slot_index, _shared_slot, _block_id, _narrow_table, _total_lens]


@pytest.mark.parametrize("corrupt", BAD_INPUTS)
def test_bad_inputs_are_errors_and_leave_the_pools_alone(corrupt):
    batch = Batch(FORMATS[0], rows=2, seed=4)
    x = batch.inputs([40, 20])
    override, message = corrupt(batch, x)
    pool, slots = batch.pool.copy(), batch.slots.copy()
    with pytest.raises(InvalidArgument, match=message):
        batch.session.run(None, _feeds(batch, x, **override))
    assert np.array_equal(pool, batch.pool) and np.array_equal(slots, batch.slots)


@pytest.mark.parametrize(
    "attrs,message",
    [
        (
            dict(spec="8:1,3;stage=8"),
            r"saq attribute '8:1,3;stage=8': SAQ stair widths \[8, 3\]: each must be",
        ),
        (dict(spec="8:1,2;stage=12"), r"SAQ stage of 12 tokens: use a multiple of 8"),
        (dict(spec="8,2"), r"every stair but the last needs BITS:STAGES"),
        (dict(spec="4;x=1"), r"SAQ option 'x=1': use stage=N"),
        (dict(spec="8:1,2;stage=8;sink_tokens=8"), r"SAQ sink_tokens=8: use 0 up to stage - 1 \(7\)"),
        (dict(spec=""), r"saq is empty"),
        (
            dict(kv_format="int8", spec=FORMATS[0]),
            r"kv_format 'int8': FlashAttentionSaq runs the SAQ staircase",
        ),
        (dict(num_heads=3, spec=FORMATS[0]), r"num_heads=3 is not a multiple of num_kv_heads=2"),
    ],
    ids=["width", "stage", "stairs", "option", "sink-tokens", "empty", "kv-format", "gqa"],
)
def test_bad_attributes_fail_session_creation(attrs, message):
    spec = attrs.pop("spec")
    attrs = dict(num_heads=4, num_kv_heads=2, head_dim=32) | attrs
    with pytest.raises(RuntimeException, match=message):
        make_session(saq_model(TensorProto.FLOAT, spec=spec, **attrs))


@pytest.mark.parametrize(
    "spec",
    ["8:1,3;stage=8", "2,4", "8:1,2;stage=12", "8,2", "8:x,2", "4;x=1", "4;sink_tokens=-1", "4;clip=3",
     "8:1,2;stage=8;sink_tokens=8", "4;stage=16;sink_tokens=99"],
)  # fmt: skip
def test_format_errors_are_the_specs(spec):
    """The kernel's message for a bad spec holds SaqFormat.parse's, word for word."""
    with pytest.raises(ValueError) as expected:
        SaqFormat.parse(spec, 64)
    with pytest.raises(RuntimeException, match=re.escape(str(expected.value))):
        make_session(saq_model(TensorProto.FLOAT, num_heads=4, num_kv_heads=2, head_dim=32, spec=spec))


def test_v_group_must_divide_the_width():
    """v_group needs the width, known from q at run time."""
    model = saq_model(TensorProto.FLOAT, num_heads=4, num_kv_heads=2, head_dim=20, spec="4;v_group=16")
    batch = Batch(FORMATS[2], rows=1)
    x = batch.inputs([3])
    zeros = dict(q=np.zeros((1, 3, 80), np.float32), k=np.zeros((1, 3, 40), np.float32))
    feeds = _feeds(batch, x, **zeros, v=zeros["k"])
    with pytest.raises(InvalidArgument, match=r"SAQ v_group 16 must divide the KV width 40"):
        make_session(model).run(None, feeds)
