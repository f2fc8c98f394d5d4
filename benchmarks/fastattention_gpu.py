"""FastAttention's variants on one GPU: Volta tiles, CPU-GPU KV offload, NPU-style tiling.

    python -m benchmarks.fastattention_gpu [--out PATH]

Every time is the median of CUDA-event timings of back-to-back calls after warm-up, in one process, with the
baseline measured beside it:

- **volta**: the Triton prefill and decode kernels with the sm70 tiles (kernels/attention_volta.py) vs the
  tuned Hopper tiles, fp16. This is an *emulation*: on the H100 the Volta tiles run on Hopper's tensor
  cores, while on a V100 current Triton falls back to FMA (no MMAv1); the ratio shows what the smaller tiles
  and single stage cost on this card, nothing about V100 speed. Prefill: B x N = 16k tokens, causal,
  TFLOP/s = 2 * B * Hq * N^2 * D / t. Decode: one token, GB/s = K and V bytes / t.
- **offload**: one attention layer of a Llama-3-8B-like model (32 query / 8 KV heads of 128, fp16, block 16),
  B = 1, under an artificial GPU KV budget of 256 MiB: all-on-GPU holds 64k tokens. With offload the device
  holds 56k recent tokens plus two 4096-token staging tiles; older blocks live in pinned host memory. For
  each context N: the decode step (write + attention) with offload, the all-on-GPU kernel at the same N
  (ignoring the budget: the card has room), and the same with one decoder layer's GEMVs around it
  (hidden 4096, MLP 14336), so "decode-step" ratios cover a whole layer. Also the pinned host-to-device
  bandwidth, and offload == all-on-GPU on the same data at 256k.
- **npu**: two-level tiling with the compressed causal mask vs the same code cutting tiles from a
  materialized N x N mask, and vs SDPA given that N x N mask; B = 1, 8 query / 2 KV heads of 64, fp16 in,
  causal, N = 4k and 16k: time, peak allocated memory above the inputs, mask bytes, max |diff|.
Results go to benchmarks/results/fastattention_gpu.json (or --out) with the card, date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton

from kernels import attention_npu, attention_offload, attention_volta
from kernels.attention_triton_decode import flash_attention_decode, paged_attention
from kernels.attention_triton_prefill import flash_attention_prefill

RESULTS = Path(__file__).resolve().parent / "results" / "fastattention_gpu.json"
MiB = 2**20


def time_ms(fn, iters: int = 10, warmup: int = 2) -> float:
    """Median of per-call CUDA-event times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# -- 1. Volta tiles vs tuned tiles (an emulation on this card) ----------------------------------------


def bench_volta() -> list[dict]:
    rows = [volta_prefill(h, n) for h in [(32, 8, 128), (16, 16, 64)] for n in (2048, 8192)]
    return rows + [volta_decode(h, b) for h in [(32, 8, 128), (9, 3, 64)] for b in (1, 16)]


def volta_prefill(heads: tuple[int, int, int], n: int) -> dict:
    num_heads, num_kv_heads, head_dim = heads
    batch = 16384 // n
    q = torch.randn(batch, num_heads, n, head_dim, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, num_kv_heads, n, head_dim, device="cuda", dtype=torch.float16) for _ in "kv")
    flops = 2 * batch * num_heads * n * n * head_dim  # causal: half of 4 B H N^2 D
    row = dict(op="prefill", heads=f"{num_heads}/{num_kv_heads}x{head_dim}", batch=batch, n=n)
    for name, fn in (("tuned", flash_attention_prefill), ("volta", attention_volta.flash_attention_prefill)):
        ms = time_ms(lambda fn=fn: fn(q, k, v, causal=True))
        row |= {f"{name}_ms": ms, f"{name}_tflops": flops / ms / 1e9}
    row["volta_over_tuned"] = row["volta_ms"] / row["tuned_ms"]
    print(row, flush=True)
    return row


def volta_decode(heads: tuple[int, int, int], batch: int, n: int = 32768) -> dict:
    num_heads, num_kv_heads, head_dim = heads
    width = num_kv_heads * head_dim
    k_cache, v_cache = (
        torch.randn(batch * n // 16, 16, width, device="cuda", dtype=torch.float16) for _ in "kv"
    )
    table = torch.arange(batch * n // 16, device="cuda", dtype=torch.int32).view(batch, -1)
    q = torch.randn(batch, 1, num_heads * head_dim, device="cuda", dtype=torch.float16)
    lens = torch.full((batch,), n, device="cuda", dtype=torch.int32)
    attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads)
    gbytes = 2 * batch * n * width * 2 / 1e9
    row = dict(op="decode", heads=f"{num_heads}/{num_kv_heads}x{head_dim}", batch=batch, n=n)
    for name, fn in (("tuned", flash_attention_decode), ("volta", attention_volta.flash_attention_decode)):
        ms = time_ms(lambda fn=fn: fn(q, k_cache, v_cache, table, lens - 1, lens, **attrs))
        row |= {f"{name}_ms": ms, f"{name}_gbps": gbytes / ms * 1e3}
    row["volta_over_tuned"] = row["volta_ms"] / row["tuned_ms"]
    print(row, flush=True)
    return row


# -- 2. CPU-GPU cooperative KV offload -----------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
WIDTH = KV_HEADS * HEAD_DIM
TOKEN_BYTES = 2 * WIDTH * 2  # K and V, fp16
BUDGET_BYTES = 256 * MiB
TILE_BLOCKS = 256  # 4096 tokens per staged tile
CONTEXTS = [65536, 131072, 262144, 524288, 1048576, 2097152]


def random_fill(t: torch.Tensor, chunk_rows: int = 4096) -> None:
    """Fill a (pinned) host tensor with normals made on the GPU, chunk by chunk."""
    for i in range(0, t.shape[0], chunk_rows):
        part = t[i : i + chunk_rows]
        part.copy_(torch.randn(part.shape, device="cuda", dtype=t.dtype))


class DecoderLayerGemv:
    """One Llama-3-8B decoder layer's projections at B = 1 (fp16), attention excluded."""

    def __init__(self, hidden: int = 4096, ffn: int = 14336) -> None:
        w = lambda n, k: torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5  # noqa: E731
        self.qkv, self.o = w(HEADS * HEAD_DIM + 2 * WIDTH, hidden), w(hidden, HEADS * HEAD_DIM)
        self.gate_up, self.down = w(2 * ffn, hidden), w(hidden, ffn)
        self.x = torch.randn(1, hidden, device="cuda", dtype=torch.float16)

    def __call__(self, attention) -> None:
        F.linear(self.x, self.qkv)
        out = attention()
        h = self.x + F.linear(out.view(1, -1), self.o)
        gate, up = F.linear(h, self.gate_up).chunk(2, -1)
        F.linear(F.silu(gate) * up, self.down)


def bench_offload() -> dict:
    stream = attention_offload.HostKVStream(tile_blocks=TILE_BLOCKS, block_size=BLOCK, width=WIDTH,
                                            dtype=torch.float16, device="cuda")  # fmt: skip
    gpu_max_tokens = BUDGET_BYTES // TOKEN_BYTES
    resident_blocks = (BUDGET_BYTES - stream.staging_bytes) // (BLOCK * TOKEN_BYTES)
    gpu_blocks = resident_blocks + 1  # + the scratch block 0
    host_blocks = max(CONTEXTS) // BLOCK
    result = dict(
        budget_bytes=BUDGET_BYTES, staging_bytes=stream.staging_bytes, tile_tokens=TILE_BLOCKS * BLOCK
    )
    result |= dict(resident_tokens=resident_blocks * BLOCK, gpu_max_tokens_without_offload=gpu_max_tokens)
    k_dev, v_dev = (torch.randn(gpu_blocks, BLOCK, WIDTH, device="cuda", dtype=torch.float16) for _ in "kv")
    host_k, host_v = (attention_offload.host_pool(host_blocks, BLOCK, WIDTH, torch.float16) for _ in "kv")
    for t in (host_k, host_v):
        random_fill(t)
    big_k, big_v = (torch.randn(host_blocks, BLOCK, WIDTH, device="cuda", dtype=torch.float16) for _ in "kv")
    q = torch.randn(1, 1, HEADS * HEAD_DIM, device="cuda", dtype=torch.float16)
    k_new, v_new = (torch.randn(1, 1, WIDTH, device="cuda", dtype=torch.float16) for _ in "kv")
    attrs = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, scale=HEAD_DIM**-0.5)
    layer = DecoderLayerGemv()
    gemv_ms = time_ms(lambda: layer(lambda: q))
    copy = torch.empty(256 * MiB // 2, device="cuda", dtype=torch.float16)
    pinned = host_k.view(-1)[: copy.numel()]
    result["h2d_pinned_gbps"] = (
        copy.numel() * 2 / time_ms(lambda: copy.copy_(pinned, non_blocking=True)) / 1e6
    )
    result["layer_gemv_ms"] = gemv_ms
    rows = []
    for n in CONTEXTS:
        resident = min(n, resident_blocks * BLOCK)
        host_tokens = n - resident
        # positions [0, host_tokens) -> host rows 0.. (ids gpu_blocks..), the rest -> device blocks 1..
        ids = [gpu_blocks + j for j in range(host_tokens // BLOCK)] + list(range(1, resident // BLOCK + 1))
        table = torch.tensor([ids], dtype=torch.int32, device="cuda")
        past = torch.tensor([n - 1], dtype=torch.int32, device="cuda")
        total = past + 1
        slot = torch.tensor([[ids[-1] * BLOCK + BLOCK - 1]], device="cuda")
        plan = attention_offload.plan_offload(
            table.cpu().numpy(), slot.cpu().numpy(), past.cpu().numpy(), total.cpu().numpy(),
            gpu_blocks=gpu_blocks, block_size=BLOCK, tile_blocks=TILE_BLOCKS, sliding_window=0,
            device=torch.device("cuda"),
        )  # fmt: skip

        def offload(plan=plan, table=table, past=past, total=total, slot=slot):
            return attention_offload.paged_attention_offload(
                q, k_new, v_new, k_dev, v_dev, host_k, host_v, table, slot, past, total, stream=stream,
                plan=plan, **attrs,
            )[0]  # fmt: skip

        big_table = torch.arange(n // BLOCK, dtype=torch.int32, device="cuda").view(1, -1)
        big_slot = torch.tensor([[n - 1]], device="cuda")

        def all_on_gpu(big_table=big_table, past=past, total=total, big_slot=big_slot):
            return paged_attention(q, k_new, v_new, big_k, big_v, big_table, big_slot, past, total, **attrs)[
                0
            ]

        iters = 5 if n >= 1048576 else 10
        row = dict(
            n=n, x_budget=n / gpu_max_tokens, host_tokens=host_tokens, host_bytes=host_tokens * TOKEN_BYTES
        )
        row["runs_on_gpu_within_budget"] = n <= gpu_max_tokens
        row["offload_ms"] = time_ms(offload, iters)
        row["all_on_gpu_ms"] = time_ms(all_on_gpu, iters)
        row["offload_layer_ms"] = time_ms(lambda: layer(offload), iters)
        row["all_on_gpu_layer_ms"] = time_ms(lambda: layer(all_on_gpu), iters)
        row["offload_over_all_on_gpu"] = row["offload_ms"] / row["all_on_gpu_ms"]
        row["layer_offload_over_all_on_gpu"] = row["offload_layer_ms"] / row["all_on_gpu_layer_ms"]
        row["host_stream_gbps"] = row["host_bytes"] / row["offload_ms"] / 1e6 if host_tokens else None
        rows.append(row)
        print(row, flush=True)
    result["contexts"] = rows
    result["equality_at_262144"] = offload_equality(k_dev, v_dev, host_k, host_v, gpu_blocks, stream, attrs)
    ran = [r["n"] for r in rows]
    result["longest_with_offload"] = max(ran)
    result["longest_without_offload"] = max(n for n in ran if n <= gpu_max_tokens)
    return result


def offload_equality(k_dev, v_dev, host_k, host_v, gpu_blocks, stream, attrs) -> dict:
    """Offload vs the all-on-GPU kernel on the same KV (host part copied to the device), 4 query tokens."""
    n, new = 262144, 4
    host_n = (n - (gpu_blocks - 1) * BLOCK) // BLOCK
    ids = [gpu_blocks + j for j in range(host_n)] + list(range(1, gpu_blocks))
    table = torch.tensor([ids], dtype=torch.int32, device="cuda")
    past = torch.tensor([n - new], dtype=torch.int32, device="cuda")
    total = past + new
    slots = torch.tensor([[ids[-1] * BLOCK + BLOCK - new + s for s in range(new)]], device="cuda")
    q = torch.randn(1, new, HEADS * HEAD_DIM, device="cuda", dtype=torch.float16)
    k_new, v_new = (torch.randn(1, new, WIDTH, device="cuda", dtype=torch.float16) for _ in "kv")
    inputs = (q, k_new, v_new, k_dev, v_dev, host_k, host_v, table, slots, past, total)
    got = attention_offload.paged_attention_offload(*inputs, stream=stream, **attrs)[0]
    whole_k = torch.cat([k_dev, host_k[:host_n].cuda()])
    whole_v = torch.cat([v_dev, host_v[:host_n].cuda()])
    expected = paged_attention(q, k_new, v_new, whole_k, whole_v, table, slots, past, total, **attrs)[0]
    return dict(n=n, query_tokens=new, max_abs_diff=float((got.float() - expected.float()).abs().max()))


# -- 3. NPU-style: two-level tiling + tiling-mask ------------------------------------------------------


def bench_npu() -> list[dict]:
    return [npu_row(n) for n in (4096, 16384)]


def npu_row(n: int) -> dict:
    """Compressed-mask tiling vs the same tiling over a materialized N x N mask vs SDPA with that mask
    (the mask is built inside each call, as a caller without the compressed mask would)."""
    q = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.float16) for _ in "kv")
    kx, vx = (x.repeat_interleave(4, dim=1) for x in (k, v))  # SDPA with a mask: K/V expanded outside
    row = dict(
        n=n, heads="8/2x64", compressed_mask_bytes=attention_npu.CompressedCausalMask(128, 1024).nbytes
    )
    row["materialized_mask_bytes"] = n * n
    row["mask_bytes_ratio"] = row["materialized_mask_bytes"] / row["compressed_mask_bytes"]

    def full_mask():
        return torch.ones(n, n, dtype=torch.bool, device="cuda").tril()

    outputs = {}
    for name, fn in (
        ("compressed", lambda: attention_npu.npu_attention(q, k, v)),
        ("materialized", lambda: attention_npu.npu_attention(q, k, v, full_mask=full_mask())),
        ("sdpa_mask", lambda: F.scaled_dot_product_attention(q, kx, vx, attn_mask=full_mask())),
    ):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outputs[name] = fn()
        torch.cuda.synchronize()
        row[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        row[f"{name}_ms"] = time_ms(fn, iters=3, warmup=1)
    for name in ("materialized", "sdpa_mask"):
        row[f"max_abs_diff_vs_{name}"] = float(
            (outputs["compressed"].float() - outputs[name].float()).abs().max()
        )
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", choices=["volta", "offload", "npu"], action="append")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=props.name,
        capability=f"sm_{props.major}{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        numpy=np.__version__,
        command="python -m benchmarks.fastattention_gpu",
        note="volta rows are an emulation of the sm70 tiling on this card (current Triton has no Volta "
        "tensor-core path); they say nothing about V100 speed",
    )
    sections = dict(offload=bench_offload, volta=bench_volta, npu=bench_npu)
    for name in args.only or sections:
        result[name] = sections[name]()
        torch.cuda.empty_cache()
        Path(args.out).write_text(
            json.dumps(result, indent=1)
        )  # after each section: a timeout keeps the rest
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
