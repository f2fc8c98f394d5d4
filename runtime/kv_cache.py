"""KV-cache accounting: fixed-size blocks of the paged pool (and per-sequence slots) handed to sequences.

The pool itself lives in the backend, one set of arrays per layer (`pool_tensors` below says which);
this module decides which blocks and which slot belong to which sequence. Block 0 is the scratch
block and slot 0 the scratch slot: padding writes there and nothing reads them.

A sequence gets every block it can need (prompt + max_tokens) when it is admitted, and its slot when
the format has per-sequence tensors (SAQ), so a running sequence never waits for memory and nothing
has to be preempted; `free` returns them all. Its block table has a column per block of tokens (SAQ: per
stage); a format may keep some of them out of the pool (`paged_blocks`: SAQ's stages that never leave
the slot, its sinks and the stages still on the upper stairs at the sequence's final length,
SaqFormat.bottom_stages). Those columns name the scratch block, and only the blocks really handed out
are counted (bytes_in_use, can_allocate) and given back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kernels.kv_formats import KV_QUANT_FORMATS, SAQ_FORMAT, SaqFormat, code_width, group_size
from runtime.errors import ResourceExhaustedError

SCRATCH_BLOCK = 0
SCRATCH_SLOT = 0


@dataclass(frozen=True)
class KVCacheLayout:
    """Sizes of the pool. Bytes are over all layers: a block costs block_size * bytes_per_token for
    its per-token tensors plus block_record_bytes for its per-block ones; a slot bytes_per_slot."""

    num_blocks: int  # including the scratch block
    block_size: int  # tokens per block
    bytes_per_token: int  # per-token tensors (K and V, codes and scales)
    num_slots: int = 0  # per-sequence slots including the scratch slot; 0: the format has none
    bytes_per_slot: int = 0  # per-slot tensors (SAQ: the open stage and the upper stairs' rings)
    block_record_bytes: int = 0  # per-block tensors (SAQ: one bottom-stair record)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token + self.block_record_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + self.num_slots * self.bytes_per_slot


def layout_for_budget(
    kv_cache_bytes: int,
    block_size: int,
    bytes_per_token: int,
    *,
    block_record_bytes: int = 0,
    num_slots: int = 0,
    bytes_per_slot: int = 0,
) -> KVCacheLayout:
    """The slots (charged except the scratch one), then as many blocks as fit, plus the scratch block."""
    block_bytes = block_size * bytes_per_token + block_record_bytes
    slot_bytes = max(num_slots - 1, 0) * bytes_per_slot
    usable = (kv_cache_bytes - slot_bytes) // block_bytes
    if usable < 1:
        slots = f" after {num_slots - 1} sequence slots of {bytes_per_slot} bytes" if num_slots else ""
        raise ResourceExhaustedError(
            f"kv_cache_bytes {kv_cache_bytes} holds no KV block of {block_bytes} bytes{slots}; raise "
            f"kv_cache_bytes{' or lower max_batch_size' if num_slots else ''}"
        )
    return KVCacheLayout(
        usable + 1, block_size, bytes_per_token, num_slots, bytes_per_slot, block_record_bytes
    )


class KVBlockAllocator:
    """Free lists of blocks and slots, each sequence's block table and slot.

    paged_blocks(num_tokens): the columns of a `num_tokens`-token sequence's table that hold data in the
    pool (SAQ: SaqFormat.bottom_stages); by default all blocks_for(num_tokens) of them. It must grow with
    num_tokens: a sequence gets the blocks of its final length at admission."""

    MAX_TOKENS = 1 << 40  # capacity_tokens searches no further (a format that pages nothing fits any length)

    def __init__(self, layout: KVCacheLayout, paged_blocks: Callable[[int], Sequence[int]] | None = None):
        self.layout = layout
        self._paged = paged_blocks or (lambda num_tokens: range(self.blocks_for(num_tokens)))
        self._free = list(range(layout.num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}
        self._free_slots = list(range(layout.num_slots - 1, SCRATCH_SLOT, -1))
        self._slots: dict[str, int] = {}
        self.capacity_tokens = self._capacity()

    def blocks_for(self, num_tokens: int) -> int:
        """Columns of the block table of a `num_tokens`-token sequence."""
        return -(-num_tokens // self.layout.block_size)

    def paged_blocks(self, num_tokens: int) -> Sequence[int]:
        """The columns that get a block of the pool; the others name the scratch block."""
        return self._paged(num_tokens)

    def _capacity(self) -> int:
        """Tokens one sequence could hold if it had the whole pool (capacity_tokens): the longest length
        whose paged blocks fit, by doubling then bisection (paged_blocks grows with the length)."""
        usable = self.layout.num_blocks - 1
        lo = usable * self.layout.block_size  # fits: never more paged blocks than columns
        hi = 2 * lo + self.layout.block_size
        while hi <= self.MAX_TOKENS and len(self._paged(hi)) <= usable:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:  # lo fits, hi does not (or is past MAX_TOKENS)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if len(self._paged(mid)) <= usable else (lo, mid)
        return min(lo, self.MAX_TOKENS)

    def bytes_for(self, num_tokens: int) -> int:
        """Bytes `allocate` takes for a `num_tokens`-token sequence: its paged blocks, and its slot."""
        slot = self.layout.bytes_per_slot if self.layout.num_slots else 0
        return len(self._paged(num_tokens)) * self.layout.bytes_per_block + slot

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether the blocks for `num_tokens` tokens (and a slot, if the format has slots) are free now."""
        slot_free = self.layout.num_slots == 0 or bool(self._free_slots)
        return slot_free and len(self._paged(num_tokens)) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give `seq_id` the blocks for `num_tokens` tokens (and a slot); raises if they are not free now.
        Returns its block table: blocks_for(num_tokens) columns, the scratch block where none is paged."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds KV blocks")
        paged = self._paged(num_tokens)
        if len(paged) > len(self._free):
            raise ResourceExhaustedError(
                f"KV cache full: {len(paged)} blocks needed for {num_tokens} tokens, {len(self._free)} free"
            )
        if self.layout.num_slots and not self._free_slots:
            raise ResourceExhaustedError(
                f"KV cache full: all {self.layout.num_slots - 1} sequence slots are held"
            )
        table = [SCRATCH_BLOCK] * self.blocks_for(num_tokens)
        for column in paged:
            table[column] = self._free.pop()
        self._tables[seq_id] = table
        if self.layout.num_slots:
            self._slots[seq_id] = self._free_slots.pop()
        return table

    def free(self, seq_id: str) -> None:
        """Return the sequence's blocks and slot; freeing an unknown or already freed sequence is a no-op."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(reversed([block for block in table if block != SCRATCH_BLOCK]))
        if seq_id in self._slots:
            self._free_slots.append(self._slots.pop(seq_id))

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def slot(self, seq_id: str) -> int:
        """The sequence's slot; the scratch slot when the format has none."""
        if seq_id not in self._tables:
            raise KeyError(seq_id)
        return self._slots.get(seq_id, SCRATCH_SLOT)

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.layout.num_blocks - 1 - len(self._free)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def used_slots(self) -> int:
        return len(self._slots)

    @property
    def bytes_in_use(self) -> int:
        return self.used_blocks * self.layout.bytes_per_block + self.used_slots * self.layout.bytes_per_slot

    @property
    def bytes_free(self) -> int:
        return self.free_blocks * self.layout.bytes_per_block + self.free_slots * self.layout.bytes_per_slot


# ----------------------------------------------------------------------------------------------
# Formats: which tensors make up one layer's pool, and what a token costs

PER = ("token", "block", "slot")


@dataclass(frozen=True)
class PoolTensor:
    """One tensor of a layer's pool, named `{name}.{layer}`, of `dtype`, with rows of `width`:

    per "token": [num_blocks, block_size, width], a row per cached token (K, V, their scales);
    per "block": [num_blocks, width], a row per block (SAQ: one bottom-stair record);
    per "slot":  [num_slots, width], a row per sequence (SAQ: the open stage and the upper stairs).
    """

    name: str
    width: int
    dtype: np.dtype
    per: str = "token"

    def __post_init__(self) -> None:
        if self.per not in PER:
            raise ValueError(f"pool tensor {self.name}: per {self.per!r} is not one of {', '.join(PER)}")

    @property
    def row_bytes(self) -> int:
        return self.width * np.dtype(self.dtype).itemsize

    def shape(self, layout: KVCacheLayout) -> tuple[int, ...]:
        """The array one layer holds for this tensor."""
        if self.per == "token":
            return (layout.num_blocks, layout.block_size, self.width)
        return (layout.num_blocks if self.per == "block" else layout.num_slots, self.width)


FLOAT_FORMATS = {"fp32": np.float32, "fp16": np.float16}


def pool_tensors(kv_format: str, width: int, head_dim: int, saq: str = "") -> list[PoolTensor]:
    """K and V (codes, for a quantized format, then their fp16 scales): see kernels/kv_quant.py.
    SAQ (`saq`: the staircase text, kernels/kv_formats.py): the paged bottom-stair records and the
    per-sequence slots, both opaque bytes to the runtime."""
    if kv_format in FLOAT_FORMATS:
        dtype = np.dtype(FLOAT_FORMATS[kv_format])
        return [PoolTensor("k_cache", width, dtype), PoolTensor("v_cache", width, dtype)]
    if kv_format == SAQ_FORMAT:
        fmt = SaqFormat.parse(saq, width)
        return [
            PoolTensor("kv_pool", fmt.block_bytes, np.dtype(np.uint8), "block"),
            PoolTensor("kv_slots", fmt.slot_bytes, np.dtype(np.uint8), "slot"),
        ]
    if kv_format not in KV_QUANT_FORMATS:
        raise ValueError(f"unknown KV format {kv_format!r}")
    codes = np.dtype(np.int8 if kv_format == "int8" else np.uint8)
    scales = width // group_size(kv_format, head_dim)
    return [
        PoolTensor("k_cache", code_width(kv_format, width), codes),
        PoolTensor("v_cache", code_width(kv_format, width), codes),
        PoolTensor("k_scale", scales, np.dtype(np.float16)),
        PoolTensor("v_scale", scales, np.dtype(np.float16)),
    ]


def pool_bytes(pool: list[PoolTensor], num_layers: int) -> dict[str, int]:
    """Bytes of one row of each kind over all layers: {"token": .., "block": .., "slot": ..}."""
    return {per: num_layers * sum(t.row_bytes for t in pool if t.per == per) for per in PER}


def pool_bytes_per_token(pool: list[PoolTensor], num_layers: int, block_size: int) -> int:
    """KV bytes one token takes over all layers: its per-token rows, plus its share of a per-block
    row (SAQ: the bottom stair's record over the stage's tokens, rounded up; every stage ends there).
    Per-sequence slots are not in it (counted per sequence)."""
    sizes = pool_bytes(pool, num_layers)
    return sizes["token"] + -(-sizes["block"] // block_size)


def bytes_per_token(kv_format: str, num_layers: int, width: int, head_dim: int, saq: str = "") -> int:
    """KV bytes one token takes over all layers (codes and scales included; SAQ: see pool_bytes_per_token)."""
    pool = pool_tensors(kv_format, width, head_dim, saq)
    stage = SaqFormat.parse(saq, width).stage if kv_format == SAQ_FORMAT else 1
    return pool_bytes_per_token(pool, num_layers, stage)


def num_slots_for(pool: list[PoolTensor], max_batch_size: int) -> int:
    """Slots a pool with per-sequence tensors gets (0 without): the scratch slot, one per running
    sequence (max_batch_size) and as many again for sequences kept for KV export (a prefill node holds
    each prompt until a decode node pulls it). A request that finds every slot held waits, as it does
    for blocks."""
    return 2 * max_batch_size + 1 if any(t.per == "slot" for t in pool) else 0


def layout_for_pool(
    kv_cache_bytes: int, block_size: int, pool: list[PoolTensor], num_layers: int, num_slots: int
) -> KVCacheLayout:
    """layout_for_budget for the pool tensors of a format."""
    sizes = pool_bytes(pool, num_layers)
    return layout_for_budget(
        kv_cache_bytes,
        block_size,
        sizes["token"],
        block_record_bytes=sizes["block"],
        num_slots=num_slots,
        bytes_per_slot=sizes["slot"],
    )
