"""The SAQ staircase on the GPU (kernels/attention_triton_saq.py) against its spec,
kernels/kv_saq.paged_attention_saq_ref.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel module
loads) at small shapes; with CUDA the same tests run on the device, plus the ``gpu`` larger shapes.

- Every call starts from one cache state for both: the node on the device (attend, then write) and the
  spec on a CPU copy. o is held to the FlashAttention rule against the spec's fp32 output:
  ``max|o - ref| <= 2 * max|ref_rounded - ref| + ATOL`` (ref_rounded: ref in q's dtype); ATOL covers
  the kernel's fp16 dots (dequantized K and V, and P, rounded to fp16; the interpreter rounds code *
  scale + lo twice where the GPU fuses it).
- The cache after the write equals the spec's byte for byte, except where the clipping search meets a
  near-tie (its sums run in another order): with clipping on, at most 1% of the record bytes differ.
  The open stage (fp16 tails) and the token sinks' fp16 rows are always exact.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels.attention_triton_saq import (  # noqa: E402
    attention_saq_torch,
    flash_attention_decode_saq,
    kernel_supports,
    paged_attention_saq,
    quantize_device,
)
from kernels.kv_formats import SAQ_DEFAULT, SaqFormat  # noqa: E402
from kernels.kv_saq import paged_attention_saq_ref, quantize_asym  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 4e-3
MAX_CLIPPED_MISMATCH = 0.01


class Sequences:
    """A batch of rows over one SAQ cache: a shuffled block table (block 0 and slot 0 are scratch),
    each row in its own slot, and a stream of random q/k/v (K with per-channel ranges)."""

    def __init__(self, spec: str, num_heads: int, num_kv_heads: int, head_dim: int, *, rows: int = 2,
                 max_blocks: int = 8, seed: int = 0, dtype=torch.float16):  # fmt: skip
        self.fmt = SaqFormat.parse(spec, num_kv_heads * head_dim)
        self.heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, scale=head_dim**-0.5)
        self.dtype = dtype
        self.g = torch.Generator().manual_seed(seed)
        blocks = torch.randperm(rows * max_blocks, generator=self.g) + 1
        self.table = blocks.view(rows, max_blocks).int()
        self.pool = torch.zeros(rows * max_blocks + 1, self.fmt.block_bytes, dtype=torch.uint8)
        self.slots = torch.zeros(rows + 1, self.fmt.slot_bytes, dtype=torch.uint8)
        self.seq_slots = torch.arange(rows, 0, -1, dtype=torch.int32)  # row 0 in the last slot
        self.lens = [0] * rows
        self.k_range = torch.linspace(0.2, 3, self.fmt.width)

    def inputs(self, new_lens: list[int]):
        rows, width = len(new_lens), self.fmt.width
        S = max(new_lens)
        q_width = self.heads["num_heads"] * width // self.heads["num_kv_heads"]
        q = torch.randn(rows, S, q_width, generator=self.g)
        k = torch.randn(rows, S, width, generator=self.g) * self.k_range - 0.5
        v = torch.randn(rows, S, width, generator=self.g)
        past = torch.tensor(self.lens, dtype=torch.int32)
        total = past + torch.tensor(new_lens, dtype=torch.int32)
        return [x.to(self.dtype) for x in (q, k, v)], past, total

    def fill(self, new_lens: list[int]) -> None:
        """Write the next tokens through the spec alone (a cache state for the read-only tests)."""
        (q, k, v), args = self.read_inputs(new_lens)
        _, self.pool, self.slots = paged_attention_saq_ref(q, k, v, *args, fmt=self.fmt, **self.heads)
        self.lens = args[4].tolist()

    def read_inputs(self, new_lens: list[int]) -> tuple[list[torch.Tensor], tuple]:
        """The next step's (q, k, v) and the cache arguments of a read (nothing written)."""
        (q, k, v), past, total = self.inputs(new_lens)
        return [q, k, v], (self.pool, self.slots, self.table, past, total, self.seq_slots)

    def step(self, new_lens: list[int], **options) -> None:
        """One call of the node vs the spec from the same state; the state moves on with the node's."""
        (q, k, v), past, total = self.inputs(new_lens)
        args = (self.pool, self.slots, self.table, past, total, self.seq_slots)
        ref, ref_pool, ref_slots = paged_attention_saq_ref(q.float(), k, v, *args, fmt=self.fmt, **self.heads,
                                                           **options)  # fmt: skip
        dev = [x.to(DEVICE) for x in (q, k, v, *args)]
        o, pool, slots = paged_attention_saq(*dev, fmt=self.fmt, **self.heads, use_kernel=True, **options)
        assert pool.data_ptr() == dev[3].data_ptr() and slots.data_ptr() == dev[4].data_ptr(), "not in place"
        where = f"step from lengths {self.lens} by {new_lens}"
        check_output(o.cpu(), ref, new_lens, where)
        self.pool, self.slots = pool.cpu(), slots.cpu()
        check_cache(self.fmt, self.pool, self.slots, ref_pool, ref_slots, where)
        self.lens = total.tolist()


def check_output(o: torch.Tensor, ref: torch.Tensor, new_lens: list[int], where: str = "") -> None:
    assert torch.isfinite(o).all(), where
    for b, n in enumerate(new_lens):
        if n:
            error = (o[b, :n].float() - ref[b, :n]).abs().max().item()
            bound = 2 * (ref[b, :n].to(o.dtype).float() - ref[b, :n]).abs().max().item() + ATOL
            assert error <= bound, f"{where} row {b}: max|o - ref| = {error:.3g} > {bound:.3g}"


def check_cache(fmt: SaqFormat, pool, slots, ref_pool, ref_slots, where: str = "") -> None:
    rows = fmt.sink_offset  # the open stage's and the token sinks' fp16 rows
    assert torch.equal(slots[:, :rows], ref_slots[:, :rows]), f"{where}: fp16 rows differ from the spec"
    records = [(pool, ref_pool), (slots[:, rows:], ref_slots[:, rows:])]
    differing = sum((got != want).sum().item() for got, want in records)
    total = sum(got.numel() for got, _ in records)
    allowed = MAX_CLIPPED_MISMATCH * total if fmt.clip else 0
    assert differing <= allowed, f"{where}: {differing} of {total} record bytes differ from the spec"


# ---------------------------------------------------------------- small shapes (CI, the interpreter)


DECODE_CASES = [  # spec, (Hq, Hkv, D), q dtype, prefill lengths, decode steps
    ("8:1,4:2,2;stage=8;v_group=16;sink=1;clip=2", (4, 2, 64), torch.float16, [30, 11], 16),
    ("8:1,4:1,2;stage=16;v_group=32", (8, 1, 128), torch.float32, [40, 10], 12),
    ("4:2,2;stage=8;v_group=128;sink=2;clip=4", (8, 2, 64), torch.float16, [33, 3], 12),
    # token sinks: row 0's stage 0 closes in a decode step, row 1's inside its chunk
    ("8:1,4:2,2;stage=8;v_group=16;sink_tokens=3;clip=2", (4, 2, 64), torch.float16, [5, 25], 12),
    ("4:2,2;stage=16;v_group=32;sink=1;sink_tokens=1", (4, 1, 128), torch.float32, [15, 60], 10),
]


@pytest.mark.parametrize(
    "spec, heads, dtype, prefill, steps", DECODE_CASES,
    ids=["sink-clip", "gqa8", "wide-v", "token-sinks", "token-sink-in-sink-d128"],
)  # fmt: skip
def test_decode_token_by_token_matches_spec(spec, heads, dtype, prefill, steps):
    """A prefill chunk per row (several stages close in one call; 8 heads x 40 tokens run as five row
    tiles), then token-by-token decode across stage closes, the cascade and the bottom stair. Token
    sinks: stage 0 closes during decode in one row, inside the prefill chunk in the other."""
    seqs = Sequences(spec, *heads, dtype=dtype)
    seqs.step(prefill)
    for _ in range(steps):
        seqs.step([1, 1])
    upper = seqs.fmt.sink + sum(count for _, count in seqs.fmt.stairs)
    assert min(seqs.lens) > seqs.fmt.stage and max(seqs.lens) // seqs.fmt.stage > upper, "no bottom stair"


def test_multi_token_steps_padding_and_idle_rows():
    """Rows of one batch with 3, 1 and 0 new tokens (right-padded; the idle row reads and writes
    nothing), the last step crossing a stage boundary inside the new tokens."""
    seqs = Sequences("8:1,4:1,2;stage=8;v_group=32;sink=1;clip=2", 6, 2, 64, rows=3, seed=3)
    for new_lens in ([9, 20, 0], [3, 1, 0], [7, 2, 0], [3, 3, 0]):
        seqs.step(new_lens)
    assert seqs.lens == [22, 26, 0]


@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("options", [dict(causal=False), dict(sliding_window=11)], ids=["full", "window"])
def test_read_options_and_split_counts(num_splits, options):
    """The read alone, on a cache the spec wrote: any split count (splits that see no key included),
    non-causal, a sliding window that starts inside a stage."""
    seqs = Sequences("8:1,4:1,2;stage=8;v_group=16;sink=1;clip=2", 4, 2, 64, seed=4)
    seqs.fill([37, 29])
    (q, k, v), args = seqs.read_inputs([2, 1])
    ref = paged_attention_saq_ref(q.float(), k, v, *args, fmt=seqs.fmt, **seqs.heads, **options)[0]
    o = flash_attention_decode_saq(*[x.to(DEVICE) for x in (q, k, v, *args)], fmt=seqs.fmt, **seqs.heads,
                                   num_splits=num_splits, **options)  # fmt: skip
    check_output(o.cpu(), ref, [2, 1])


@pytest.mark.parametrize("options", [dict(causal=False), dict(sliding_window=11)], ids=["full", "window"])
def test_read_of_token_sinks(options):
    """The read alone over token sinks (5 of a stage of 8) in three splits: row 0 far past them (the
    window leaves them out), row 1's window starting inside them (positions 2.. of 12 past)."""
    seqs = Sequences("8:1,4:1,2;stage=8;v_group=16;sink_tokens=5;clip=2", 4, 2, 64, seed=10)
    seqs.fill([37, 12])
    (q, k, v), args = seqs.read_inputs([2, 1])
    ref = paged_attention_saq_ref(q.float(), k, v, *args, fmt=seqs.fmt, **seqs.heads, **options)[0]
    o = flash_attention_decode_saq(*[x.to(DEVICE) for x in (q, k, v, *args)], fmt=seqs.fmt, **seqs.heads,
                                   num_splits=3, **options)  # fmt: skip
    check_output(o.cpu(), ref, [2, 1])


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize(
    "case",
    [DECODE_CASES[0], DECODE_CASES[2], (DECODE_CASES[2][0], (4, 1, 128))],
    ids=["ring2-sink1", "ring2-sink2", "ring2-sink2-d128"],
)
def test_read_of_two_entry_rings_and_sinks_over_many_stages(case, num_splits):
    """The read alone over formats with a 2-entry ring (and 2 sinks): both ring entries, the sinks and
    several bottom stages in one row, one stage per split (the shapes' own split count on the H100)
    or several (the stair loops run more than once). Regression: on the H100 (triton 3.6) the kernels
    compiled for these formats unpacked 4- and 2-bit codes with channels out of place (tl.join +
    tl.reshape); the interpreter did not."""
    spec, heads = case[:2]
    seqs = Sequences(spec, *heads, max_blocks=16, seed=9)
    seqs.fill([90, 45])
    (q, k, v), args = seqs.read_inputs([1, 2])
    ref = paged_attention_saq_ref(q.float(), k, v, *args, fmt=seqs.fmt, **seqs.heads)[0]
    o = flash_attention_decode_saq(*[x.to(DEVICE) for x in (q, k, v, *args)], fmt=seqs.fmt, **seqs.heads,
                                   num_splits=num_splits)  # fmt: skip
    check_output(o.cpu(), ref, [1, 2])


@pytest.mark.parametrize(
    "spec, head_dim",
    [("8:1,4:1,2;stage=8;v_group=16;sink=1", 32), ("8:1,4:1,2;stage=8;v_group=2;sink=1", 128)],
    ids=["d32", "vgroup2"],
)
def test_per_channel_unpack_for_narrow_heads_and_groups(spec, head_dim):
    """Heads of 32 channels (a quarter head would be a dot below 16) and V groups of 2 channels (not a
    multiple of 4) take the per-channel unpack instead of the quarter-head split."""
    seqs = Sequences(spec, 4, 2, head_dim, seed=6)
    seqs.step([27, 9])
    for _ in range(3):
        seqs.step([1, 1])


def test_torch_twin_for_formats_the_kernel_does_not_take():
    """Five stairs and head_dim 80: attention_saq_torch and the write path against the spec."""
    seqs = Sequences("8:1,8:1,4:1,4:1,2;stage=8;v_group=16;sink=1;clip=4", 4, 2, 80, seed=5)
    assert not kernel_supports(seqs.fmt, 80)
    for new_lens in ([30, 9], [1, 1], [17, 2]):
        (q, k, v), past, total = seqs.inputs(new_lens)
        args = (seqs.pool, seqs.slots, seqs.table, past, total, seqs.seq_slots)
        ref, ref_pool, ref_slots = paged_attention_saq_ref(q.float(), k, v, *args, fmt=seqs.fmt, **seqs.heads)
        o = attention_saq_torch(q, k, v, *args, fmt=seqs.fmt, **seqs.heads)
        o2, seqs.pool, seqs.slots = paged_attention_saq(q, k, v, *args, fmt=seqs.fmt, **seqs.heads)
        assert torch.equal(o, o2)
        check_output(o, ref, new_lens)
        check_cache(seqs.fmt, seqs.pool, seqs.slots, ref_pool, ref_slots)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_device_quantization_matches_spec(bits):
    """Without clipping: the spec's codes, lo and scale exactly. With clipping (all ratios at once): the
    spec's ratio group by group, bar near-ties."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(64, 4096, generator=g) * torch.linspace(0.1, 4, 4096) - 0.3).to(DEVICE)
    for dim, shape in ((0, (64, 4096)), (-1, (64, 128, 32))):  # thousands of groups: rare roundings show
        got = quantize_device(x.view(shape), bits, dim, clip=False)
        want = quantize_asym(x.view(shape).cpu(), bits, dim)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), f"dim {dim}: differs from the spec"
        got = quantize_device(x.view(shape), bits, dim, clip=True)
        want = quantize_asym(x.view(shape).cpu(), bits, dim, clip=True)
        assert [t.shape for t in got] == [t.shape for t in want] and got[0].dtype == torch.uint8
        differing_groups = (got[1].cpu() != want[1]).sum().item()
        assert differing_groups <= MAX_CLIPPED_MISMATCH * want[1].numel()
        same = (got[1].cpu() == want[1]) & (got[2].cpu() == want[2])
        assert torch.equal(got[0].cpu()[same.expand(shape)], want[0][same.expand(shape)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_heads=3), "num_heads 3 / num_kv_heads 2"),
        (dict(kv_slots=torch.zeros(3, 100, dtype=torch.uint8)), r"kv_slots must be contiguous uint8 \[N, "),
        (dict(past_lens=torch.zeros(2, dtype=torch.int64)), "past_lens must be int32"),
        (dict(spec="8:1,4:1,4:1,4:1,2;stage=8"), "at most 4 stairs"),
        (dict(k=torch.zeros(2, 1, 64)), r"k must be \[2, 1, 128\]"),
    ],
)
def test_read_rejects_bad_inputs(change, message):
    fmt = SaqFormat.parse(change.pop("spec", "8:1,2;stage=8;v_group=16"), 128)
    args = dict(
        q=torch.zeros(2, 1, 256), k=torch.zeros(2, 1, 128), v=torch.zeros(2, 1, 128),
        kv_pool=torch.zeros(4, fmt.block_bytes, dtype=torch.uint8),
        kv_slots=torch.zeros(3, fmt.slot_bytes, dtype=torch.uint8),
        block_table=torch.zeros(2, 4, dtype=torch.int32), past_lens=torch.zeros(2, dtype=torch.int32),
        total_lens=torch.ones(2, dtype=torch.int32), seq_slots=torch.ones(2, dtype=torch.int32),
        num_heads=4, num_kv_heads=2, scale=0.125, fmt=fmt,
    )  # fmt: skip
    args.update(change)
    args = {name: x.to(DEVICE) if torch.is_tensor(x) else x for name, x in args.items()}
    with pytest.raises(ValueError, match=message):
        flash_attention_decode_saq(**args)


# ---------------------------------------------------------------- larger shapes (the GPU; CI skips them)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec",
    [
        SAQ_DEFAULT,
        "8:1,4:7,2;stage=128;v_group=64;sink=1;clip=2",
        "8:1,4:10,2;stage=128;v_group=64;sink_tokens=1;clip=2",
    ],
    ids=["default", "stage128-sink", "stage128-token-sink"],
)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)], ids=["32-8-128", "9-3-64"])
def test_default_format_on_the_gpu(heads, spec):
    """The default format (SAQ_DEFAULT: 64-token stages, three token sinks, 2-bit clipping) and two with
    128-token stages (a sink stage, a token sink): prefill chunks of 700 and 300 tokens, then decode steps
    across the second row's stage close at 384."""
    seqs = Sequences(spec, *heads, max_blocks=16, seed=7)
    seqs.step([700, 300])
    seqs.step([300, 80])
    for _ in range(6):
        seqs.step([1, 1])
    assert seqs.lens == [1006, 386]


@pytest.mark.gpu
def test_read_replays_in_a_cuda_graph():
    seqs = Sequences("8:1,4:7,2;stage=128;v_group=64;sink=1;clip=2", 32, 8, 128, max_blocks=16, seed=8)
    seqs.step([1000, 513])
    (q, k, v), past, total = seqs.inputs([1, 1])
    args = [x.to(DEVICE) for x in (q, k, v, seqs.pool, seqs.slots, seqs.table, past, total, seqs.seq_slots)]
    eager = flash_attention_decode_saq(*args, fmt=seqs.fmt, **seqs.heads)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flash_attention_decode_saq(*args, fmt=seqs.fmt, **seqs.heads)
    graph.replay()
    assert torch.equal(captured, eager)
