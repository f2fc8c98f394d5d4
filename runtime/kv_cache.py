"""KV-cache accounting: fixed-size blocks of the paged pool handed to sequences.

The pool itself (one [num_blocks, block_size, num_kv_heads * head_dim] array per layer for K and
for V) lives in the backend; this module decides which blocks belong to which sequence. Block 0
is the scratch block: padding tokens write there and nothing reads it.

A sequence gets every block it can need (prompt + max_tokens) when it is admitted, so a running
sequence never waits for memory and nothing has to be preempted; `free` returns them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.kv_formats import KV_QUANT_FORMATS, code_width, group_size
from runtime.errors import ResourceExhaustedError

SCRATCH_BLOCK = 0


@dataclass(frozen=True)
class KVCacheLayout:
    """Sizes of the pool."""

    num_blocks: int  # including the scratch block
    block_size: int  # tokens per block
    bytes_per_token: int  # K and V over all layers

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def layout_for_budget(kv_cache_bytes: int, block_size: int, bytes_per_token: int) -> KVCacheLayout:
    """As many blocks as fit in the budget, plus the scratch block."""
    usable = kv_cache_bytes // (block_size * bytes_per_token)
    if usable < 1:
        need = block_size * bytes_per_token
        raise ResourceExhaustedError(
            f"kv_cache_bytes {kv_cache_bytes} holds no KV block of {need} bytes; raise kv_cache_bytes"
        )
    return KVCacheLayout(usable + 1, block_size, bytes_per_token)


class KVBlockAllocator:
    """Free list of blocks and each sequence's block table."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        self._free = list(range(layout.num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.layout.block_size)

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had the whole pool."""
        return (self.layout.num_blocks - 1) * self.layout.block_size

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give `seq_id` the blocks for `num_tokens` tokens; raises if they are not free now."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds KV blocks")
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            raise ResourceExhaustedError(
                f"KV cache full: {needed} blocks needed for {num_tokens} tokens, {len(self._free)} free"
            )
        table = [self._free.pop() for _ in range(needed)]
        self._tables[seq_id] = table
        return table

    def free(self, seq_id: str) -> None:
        """Return the sequence's blocks; freeing an unknown or already freed sequence is a no-op."""
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

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
    def bytes_in_use(self) -> int:
        return self.used_blocks * self.layout.bytes_per_block

    @property
    def bytes_free(self) -> int:
        return self.free_blocks * self.layout.bytes_per_block


# ----------------------------------------------------------------------------------------------
# Formats: which tensors make up one layer's pool, and what a token costs


@dataclass(frozen=True)
class PoolTensor:
    """One tensor of a layer's pool: [num_blocks, block_size, width] of `dtype`, named `{name}.{layer}`."""

    name: str
    width: int
    dtype: np.dtype


FLOAT_FORMATS = {"fp32": np.float32, "fp16": np.float16}


def pool_tensors(kv_format: str, width: int, head_dim: int) -> list[PoolTensor]:
    """K and V (codes, for a quantized format, then their fp16 scales): see kernels/kv_quant.py."""
    if kv_format in FLOAT_FORMATS:
        dtype = np.dtype(FLOAT_FORMATS[kv_format])
        return [PoolTensor("k_cache", width, dtype), PoolTensor("v_cache", width, dtype)]
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


def bytes_per_token(kv_format: str, num_layers: int, width: int, head_dim: int) -> int:
    """KV bytes one token takes over all layers (codes and scales included)."""
    return num_layers * sum(t.width * t.dtype.itemsize for t in pool_tensors(kv_format, width, head_dim))
