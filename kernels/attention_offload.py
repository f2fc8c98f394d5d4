"""CPU-GPU cooperative KV offload (FastAttention's low-resource-GPU strategy) for the FlashAttention node.

Contract: ``kernels.reference.paged_attention_ref`` (the ``fastattention::FlashAttention`` node), with
the paged pool split in two tiers by block id:

- blocks ``0 .. gpu_blocks - 1`` live on the device, in ``k_cache`` / ``v_cache`` [gpu_blocks, block_size,
  Hkv*D] as usual;
- blocks ``gpu_blocks ..`` live in pinned host memory, in ``host_k`` / ``host_v`` [host_blocks, block_size,
  Hkv*D]: block id g is host row g - gpu_blocks.

So a sequence whose KV is over the GPU budget keeps its other blocks (in the benchmark and the usual
long-context layout, its oldest ones) on the host. q, k, v and the outputs are device tensors.

Algorithm, per call:

1. Write this step's K/V into its slots, on the device or (through a small device-to-host copy) on the host.
2. Plan once per step (the block table is read on the host): rows whose keys are all on the device are one
   batched call of the split-KV decode kernel; every other row's keys are cut into *runs*, stretches of
   positions held in one tier (host runs also in consecutive host rows, at most ``tile_blocks`` blocks).
   Runs wholly outside a sliding window are dropped.
3. Host runs are streamed by ``HostKVStream``: a ring of ``num_buffers`` (2: double buffering) device
   staging tiles filled from pinned memory on a side CUDA stream. The first copies are issued before any
   compute, so they overlap the attention on the resident part; tile i's attention waits (on the device,
   not the host) for its copy; the copy into a buffer waits for the attention that last read it.
4. Every run gives a partial (o, lse) from the decode kernel (``return_lse``, fp32 output); partials merge
   exactly through the log-sum-exp (``merge_partials``): o = sum_i exp(lse_i - lse) o_i, lse = logsumexp_i.
   Positions are shifted per run (past - start, end - start), which keeps causal and window masks exact.

Rows of more than 16 new tokens (prefill) go through the same runs in groups of 16 queries, so host KV
still crosses PCIe once per layer and step; that path is correct but not fast (offload is for decode).
Without CUDA (tests), the copies are plain synchronous copies and ``partial_attention_torch`` (fp32 spec,
vectorized) can stand in for the Triton kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

MAX_GROUP_TOKENS = 16  # the decode kernel's query tokens per row (kernels.attention_triton_decode)


# -- merging partial results ------------------------------------------------------------------------


def merge_partials(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A u B from attention over A and over B: o [..., H*D] fp32, lse [..., H].

    A side that saw no key has lse = -inf and weighs nothing; if neither did, o = 0 and lse = -inf.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - finite).unsqueeze(-1)
    w_b = torch.exp(lse_b - finite).unsqueeze(-1)
    heads = lse.shape[-1]
    o = o_a.unflatten(-1, (heads, -1)) * w_a + o_b.unflatten(-1, (heads, -1)) * w_b
    return o.flatten(-2), lse


def partial_attention_torch(
    q, k_cache, v_cache, block_table, past_lens, total_lens,
    *, num_heads: int, num_kv_heads: int, scale: float, causal: bool = True, sliding_window: int = 0,
):  # fmt: skip
    """The node's read side in fp32 with the log-sum-exp: (o [B, S, Hq*D] fp32, lse [B, S, Hq]).

    Any S, any device; a query that sees no key gives o = 0, lse = -inf. The CPU stand-in for
    ``flash_attention_decode(..., return_lse=True)``.
    """
    B, S, _ = q.shape
    _, block_size, width = k_cache.shape
    D = width // num_kv_heads
    key_pos = torch.arange(block_table.shape[1] * block_size, device=q.device)
    slots = block_table.long()[:, key_pos // block_size] * block_size + key_pos % block_size
    keys = k_cache.reshape(-1, num_kv_heads, D)[slots].float()  # [B, T, Hkv, D]
    values = v_cache.reshape(-1, num_kv_heads, D)[slots].float()
    qf = q.float().view(B, S, num_kv_heads, num_heads // num_kv_heads, D)
    scores = torch.einsum("bshgd,bthd->bshgt", qf, keys) * scale
    query_pos = past_lens.long()[:, None] + torch.arange(S, device=q.device)  # [B, S]
    visible = key_pos < total_lens.long()[:, None, None]  # [B, 1, T]
    if causal:
        visible = visible & (key_pos <= query_pos[..., None])
    if sliding_window > 0:
        visible = visible & (query_pos[..., None] - key_pos < sliding_window)
    scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
    lse = scores.logsumexp(-1)  # [B, S, Hkv, G]
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bshgt,bthd->bshgd", probs, values)
    return out.reshape(B, S, num_heads * D), lse.reshape(B, S, num_heads)


def partial_attention_triton(q, k_cache, v_cache, block_table, past_lens, total_lens, **attrs):
    """``flash_attention_decode`` with the log-sum-exp and an fp32 output (<= 16 query tokens)."""
    from kernels.attention_triton_decode import flash_attention_decode

    return flash_attention_decode(
        q, k_cache, v_cache, block_table, past_lens, total_lens, return_lse=True, out_dtype=torch.float32,
        **attrs,
    )  # fmt: skip


# -- planning: which keys of which row live where --------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Positions [start, end) of one row's keys, all in one tier, blocks [first_block, +num_blocks)."""

    row: int
    start: int
    end: int
    on_host: bool
    first_block: int  # host runs: host row of the first block (consecutive rows follow)
    first_column: int  # device runs: column of block_table where the run starts


@dataclass(frozen=True)
class OffloadPlan:
    resident_rows: torch.Tensor  # [R] int64 (device): rows whose keys are all on the device
    runs: list[Run]  # the other rows' device runs, then host runs
    run_past: torch.Tensor  # [len(runs)] int32 (device): past_lens[row] - start, the shifted past
    run_total: torch.Tensor  # [len(runs)] int32 (device): end - start, the run's keys
    device_slots: torch.Tensor  # [n] int64 (device): flat token index -> device pool slot
    device_rows: torch.Tensor  # [n] int64 (device): which flat tokens those are
    host_slots: np.ndarray  # host pool slots of the other new tokens
    host_rows: torch.Tensor  # [m] int64 (device)


def plan_offload(
    block_table: np.ndarray,
    slot_mapping: np.ndarray,
    past_lens: np.ndarray,
    total_lens: np.ndarray,
    *,
    gpu_blocks: int,
    block_size: int,
    tile_blocks: int,
    sliding_window: int,
    device: torch.device,
) -> OffloadPlan:
    """Cut the step's rows into resident rows and runs (module docstring, step 2)."""
    resident, runs = [], []
    for b in range(block_table.shape[0]):
        total, past = int(total_lens[b]), int(past_lens[b])
        ids = block_table[b, : -(-total // block_size)].astype(np.int64)
        if (ids < gpu_blocks).all():
            resident.append(b)
            continue
        for run in _row_runs(b, ids, total, gpu_blocks, block_size, tile_blocks):
            if sliding_window <= 0 or run.end - 1 > past - sliding_window:  # else no query sees it
                runs.append(run)
    runs.sort(key=lambda r: r.on_host)  # device runs first: they overlap the first host copies
    run_past = [int(past_lens[r.row]) - r.start for r in runs]
    flat = slot_mapping.reshape(-1).astype(np.int64)
    on_host = flat >= gpu_blocks * block_size
    return OffloadPlan(
        resident_rows=_to_device(np.asarray(resident), device),
        runs=runs,
        run_past=torch.tensor(run_past, dtype=torch.int32).to(device),
        run_total=torch.tensor([r.end - r.start for r in runs], dtype=torch.int32).to(device),
        device_slots=_to_device(flat[~on_host], device),
        device_rows=_to_device(np.flatnonzero(~on_host), device),
        host_slots=flat[on_host] - gpu_blocks * block_size,
        host_rows=_to_device(np.flatnonzero(on_host), device),
    )


def _row_runs(row, ids, total, gpu_blocks, block_size, tile_blocks) -> Iterator[Run]:
    """Maximal stretches of one tier; host stretches also consecutive in the host pool, <= tile_blocks."""
    j = 0
    while j < len(ids):
        on_host = bool(ids[j] >= gpu_blocks)
        k = j + 1
        while k < len(ids) and bool(ids[k] >= gpu_blocks) == on_host:
            if on_host and (ids[k] != ids[k - 1] + 1 or k - j == tile_blocks):
                break
            k += 1
        first = int(ids[j]) - gpu_blocks if on_host else -1
        yield Run(row, j * block_size, min(k * block_size, total), on_host, first, j)
        j = k


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device)


# -- streaming host tiles ---------------------------------------------------------------------------


class HostKVStream:
    """A ring of device staging tiles filled from pinned host memory on a side CUDA stream.

    One per device, shared by every layer: layer after layer the same buffers are reused, ordered by
    events, so the staging memory (num_buffers x tile_blocks blocks of K and V) is all the GPU spends on
    offloaded KV. ``tiles`` yields each host run with its staged K and V; the caller enqueues its compute
    on the current stream before asking for the next one.
    """

    def __init__(
        self, *, tile_blocks: int, block_size: int, width: int, dtype: torch.dtype, device: torch.device,
        num_buffers: int = 2,
    ) -> None:  # fmt: skip
        if tile_blocks < 1 or num_buffers < 1:
            raise ValueError(f"tile_blocks {tile_blocks} and num_buffers {num_buffers} must be >= 1")
        self.tile_blocks, self.device = tile_blocks, torch.device(device)
        shape = (tile_blocks, block_size, width)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_buffers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_buffers)]
        self.table = torch.arange(tile_blocks, dtype=torch.int32, device=device).view(1, -1)
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._freed = [None] * num_buffers  # event: the last compute that read buffer i is done

    @property
    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def tiles(
        self, host_k: torch.Tensor, host_v: torch.Tensor, runs: list[Run]
    ) -> Iterator[tuple[Run, torch.Tensor, torch.Tensor]]:
        """Stream ``runs`` (host runs) in order. The first ``num_buffers`` copies are issued now, before
        the caller enqueues other work, so they overlap it; each later one when a buffer comes free."""
        ring = len(self.k)
        copied = [self._issue(i % ring, host_k, host_v, runs[i]) for i in range(min(ring, len(runs)))]
        return self._consume(host_k, host_v, runs, copied)

    def _consume(self, host_k, host_v, runs, copied) -> Iterator[tuple[Run, torch.Tensor, torch.Tensor]]:
        ring = len(self.k)
        compute = torch.cuda.current_stream(self.device) if self._copy_stream is not None else None
        for i, run in enumerate(runs):
            buffer = i % ring
            if compute is not None:
                compute.wait_event(copied[i])
            n = -(-(run.end - run.start) // self.k[buffer].shape[1])
            yield run, self.k[buffer][:n], self.v[buffer][:n]
            if compute is not None:
                self._freed[buffer] = compute.record_event()
            if i + ring < len(runs):
                copied.append(self._issue(buffer, host_k, host_v, runs[i + ring]))

    def _issue(self, buffer: int, host_k, host_v, run: Run):
        n = -(-(run.end - run.start) // self.k[buffer].shape[1])
        rows = slice(run.first_block, run.first_block + n)
        if self._copy_stream is None:
            self.k[buffer][:n].copy_(host_k[rows])
            self.v[buffer][:n].copy_(host_v[rows])
            return None
        with torch.cuda.stream(self._copy_stream):
            if self._freed[buffer] is not None:
                self._copy_stream.wait_event(self._freed[buffer])
            self.k[buffer][:n].copy_(host_k[rows], non_blocking=True)
            self.v[buffer][:n].copy_(host_v[rows], non_blocking=True)
            return self._copy_stream.record_event()


# -- the op -----------------------------------------------------------------------------------------


def paged_attention_offload(
    q, k, v, k_cache, v_cache, host_k, host_v, block_table, slot_mapping, past_lens, total_lens,
    *, num_heads: int, num_kv_heads: int, scale: float, causal: bool = True, sliding_window: int = 0,
    stream: HostKVStream, plan: OffloadPlan | None = None, partial: Callable | None = None,
):  # fmt: skip
    """The FlashAttention node over a two-tier pool (module docstring): returns (o, k_cache, v_cache).

    ``plan`` (from ``plan_offload``) may be passed in to share it between layers; ``partial`` is the
    partial-attention function, by default the Triton decode kernel (``partial_attention_torch`` on CPU).
    """
    gpu_blocks, block_size, width = k_cache.shape
    if host_k.shape[1:] != (block_size, width) or host_v.shape != host_k.shape:
        raise ValueError(f"host pools {tuple(host_k.shape)} / {tuple(host_v.shape)} do not match the "
                         f"device pool's blocks {(block_size, width)}")  # fmt: skip
    if plan is None:
        plan = plan_offload(
            *(x.cpu().numpy() for x in (block_table, slot_mapping, past_lens, total_lens)),
            gpu_blocks=gpu_blocks, block_size=block_size, tile_blocks=stream.tile_blocks,
            sliding_window=sliding_window, device=q.device,
        )  # fmt: skip
    _write(k, v, k_cache, v_cache, host_k, host_v, plan)
    partial = partial or (partial_attention_triton if q.is_cuda else partial_attention_torch)
    attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, causal=causal,
                 sliding_window=sliding_window)  # fmt: skip
    B, S, _ = q.shape
    o = torch.zeros(B, S, q.shape[-1], device=q.device, dtype=torch.float32)
    lse = torch.full((B, S, num_heads), float("-inf"), device=q.device)
    host_runs = [r for r in plan.runs if r.on_host]
    tiles = stream.tiles(host_k, host_v, host_runs)  # the first copies start now, on the side stream
    rows = plan.resident_rows
    if rows.numel():
        table, past, total = block_table[rows], past_lens[rows], total_lens[rows]
        table = torch.where(table < gpu_blocks, table, 0)  # columns past total_lens may name host blocks
        o[rows], lse[rows] = _attend(partial, q[rows], k_cache, v_cache, table, past, total, attrs)
    for i, run in enumerate(plan.runs):
        if run.on_host:
            staged_run, k_tile, v_tile = next(tiles)
            assert staged_run is run
            table = stream.table[:, : k_tile.shape[0]]
        else:
            k_tile, v_tile = k_cache, v_cache
            n = -(-(run.end - run.start) // block_size)
            table = block_table[run.row : run.row + 1, run.first_column : run.first_column + n]
        past, total = plan.run_past[i : i + 1], plan.run_total[i : i + 1]
        b = slice(run.row, run.row + 1)
        part = _attend(partial, q[b], k_tile, v_tile, table, past, total, attrs)
        o[b], lse[b] = merge_partials(o[b], lse[b], *part)
    return o.to(q.dtype), k_cache, v_cache


def _attend(partial, q, k_pool, v_pool, table, past, total, attrs):
    """``partial`` over queries in groups of at most 16 (the decode kernel's limit)."""
    S = q.shape[1]
    if S <= MAX_GROUP_TOKENS:
        return partial(q, k_pool, v_pool, table, past, total, **attrs)
    parts = [
        partial(q[:, s : s + MAX_GROUP_TOKENS].contiguous(), k_pool, v_pool, table, past + s, total, **attrs)
        for s in range(0, S, MAX_GROUP_TOKENS)
    ]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _write(k, v, k_cache, v_cache, host_k, host_v, plan: OffloadPlan) -> None:
    """This step's K/V into the device pool, and through a device-to-host copy into the host pool."""
    width = k_cache.shape[-1]
    k_flat, v_flat = k.reshape(-1, width), v.reshape(-1, width)
    if plan.device_rows.numel():
        k_cache.view(-1, width).index_copy_(0, plan.device_slots, k_flat[plan.device_rows].to(k_cache.dtype))
        v_cache.view(-1, width).index_copy_(0, plan.device_slots, v_flat[plan.device_rows].to(v_cache.dtype))
    if plan.host_rows.numel():
        slots = torch.from_numpy(plan.host_slots)
        host_k.view(-1, width)[slots] = k_flat[plan.host_rows].to(host_k.dtype).cpu()
        host_v.view(-1, width)[slots] = v_flat[plan.host_rows].to(host_v.dtype).cpu()


def host_pool(num_blocks: int, block_size: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed host pool, pinned when CUDA is available (asynchronous copies need pinned memory)."""
    return torch.zeros(num_blocks, block_size, width, dtype=dtype, pin_memory=torch.cuda.is_available())


class OffloadAttention:
    """One layer's FlashAttention node over a two-tier pool: the layer's host pools, plus the HostKVStream
    and the step's plan that every layer shares (the plan is made by the first layer of each step)."""

    def __init__(self, host_k: torch.Tensor, host_v: torch.Tensor, stream: HostKVStream, plans: dict) -> None:
        self.host_k, self.host_v, self.stream, self._plans = host_k, host_v, stream, plans

    def __call__(self, q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens, **attrs):
        key = (block_table, slot_mapping, past_lens, total_lens)
        cached = self._plans.get("key")
        if cached is None or any(a is not b for a, b in zip(cached, key)):
            self._plans["key"] = key
            self._plans["plan"] = plan_offload(
                *(x.cpu().numpy() for x in key), gpu_blocks=k_cache.shape[0], block_size=k_cache.shape[1],
                tile_blocks=self.stream.tile_blocks, sliding_window=attrs.get("sliding_window", 0),
                device=q.device,
            )  # fmt: skip
        return paged_attention_offload(
            q, k, v, k_cache, v_cache, self.host_k, self.host_v, block_table, slot_mapping, past_lens,
            total_lens, stream=self.stream, plan=self._plans["plan"], **attrs,
        )  # fmt: skip
