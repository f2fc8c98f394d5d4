"""Our Triton attention kernels vs PyTorch SDPA pinned to its flash, cuDNN and efficient backends, one GPU.

    python -m benchmarks.attention_gpu [--tune] [--out PATH]

Every figure is the median of ``triton.testing.do_bench`` (it flushes the 256 MB benchmark buffer
through L2 before every timed call), measured in one process beside the card's ceilings:

- **ceilings**: device copy bandwidth (1 GiB fp32 ``copy_``; bytes read + written) and bf16 GEMM rate
  (8192^3 ``a @ b`` on random data).
- **prefill**: batch x N = 64k tokens, N in {512, 2k, 8k, 16k}; heads (Hq/Hkv, D) 32/8 128, 16/16 64,
  9/3 64; causal and not; fp16 and bf16. q/k/v [B, H, N, D] contiguous, the same tensors for every
  provider. TFLOP/s = 4 * B * Hq * N^2 * D / t, halved when causal (FlashAttention's convention).
- **decode**: one query token, B in {1, 16, 32}, N in {1k, 8k, 32k}; heads 9/3 D64 and 32/8 D128;
  fp16. The KV of each input set is one pool [B * N / 16, 16, Hkv * D]: ours reads it through a
  shuffled block table (``ours_paged``) and through block_table = arange (``ours_contig``); SDPA reads
  the same memory as [B, Hkv, N, D] views. GB/s counts the I/O floor (K, V and q read once, o written
  once) and is also given as a fraction of the measured copy bandwidth. Calls rotate over enough input
  sets that the KV in flight is >= 4x the L2 size. ``*_graph`` columns time the same calls replayed
  from a CUDA graph (``do_bench_cudagraph``, median), which is how the serving loop runs decode.

SDPA gets ``enable_gqa=True`` where the backend takes it; otherwise K/V are expanded to Hq heads
outside the timed region and the row says ``kv expanded`` (the floor bytes stay the GQA ones).
``--tune`` first times every config in PREFILL_CANDIDATES / DECODE_CANDIDATES (fp16; prefill at
N=8k, decode at B=1 N=32k), uses the winners for the run, and prints them for the kernels' tables.
Results go to benchmarks/results/attention_gpu.json with the card, date, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from kernels.attention_triton_decode import DECODE_CONFIGS, DecodeConfig, flash_attention_decode
from kernels.attention_triton_prefill import PREFILL_CONFIGS, PrefillConfig, flash_attention_prefill

RESULTS = Path(__file__).resolve().parent / "results" / "attention_gpu.json"
PREFILL_TOKENS = 65536
PREFILL_LENGTHS = [512, 2048, 8192, 16384]
PREFILL_HEADS = [(32, 8, 128), (16, 16, 64), (9, 3, 64)]
DECODE_BATCHES = [1, 16, 32]
DECODE_LENGTHS = [1024, 8192, 32768]
DECODE_HEADS = [(9, 3, 64), (32, 8, 128)]
BLOCK_SIZE = 16
SDPA = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
# Candidates that compile without register spills for sm_90 under triton 3.6 (ahead-of-time compile report):
# (block_m, block_n, num_warps, num_stages) and (block_n, num_warps, num_stages).
PREFILL_CANDIDATES = {
    64: [
        PrefillConfig(*c)
        for c in [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4)]
    ],
    128: [
        PrefillConfig(*c)
        for c in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 3)]
    ],
}
DECODE_CANDIDATES = {
    d: [DecodeConfig(*c) for c in [(64, 4, 3), (64, 4, 2), (64, 4, 4), (128, 8, 3), (32, 4, 4)]]
    for d in (64, 128)
}


def median_ms(fn, rep_ms: int = 60) -> float:
    return do_bench(fn, warmup=20, rep=rep_ms, return_mode="median")


def measure_ceilings() -> dict:
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), rep_ms=200)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = median_ms(lambda: a @ b, rep_ms=200)
    return dict(copy_gb_s=2 * 2**30 / copy_ms / 1e6, gemm_bf16_tflop_s=2 * 8192**3 / gemm_ms / 1e9)


def sdpa_call(backend: SDPBackend, q, k, v, causal: bool):
    """(callable, note) running SDPA pinned to ``backend``; raises RuntimeError if it cannot run."""
    group = q.shape[1] // k.shape[1]

    def run(k, v, gqa):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run(k, v, group > 1)
            return (lambda: run(k, v, group > 1)), "enable_gqa" if group > 1 else ""
        except RuntimeError:
            if group == 1:
                raise
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        run(k, v, False)
        return (lambda: run(k, v, False)), "kv expanded"


# ---------------------------------------------------------------- prefill


def prefill_inputs(num_heads, num_kv_heads, head_dim, length, dtype):
    batch = PREFILL_TOKENS // length
    q = torch.randn(batch, num_heads, length, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, num_kv_heads, length, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v


def prefill_tflops(q, causal: bool, ms: float) -> float:
    batch, num_heads, length, head_dim = q.shape
    return 4 * batch * num_heads * length**2 * head_dim / (2 if causal else 1) / ms / 1e9


def tune_prefill() -> dict:
    winners = {}
    for (num_heads, num_kv_heads, head_dim), causal in itertools.product(
        [(32, 8, 128), (16, 16, 64)], [False, True]
    ):
        q, k, v = prefill_inputs(num_heads, num_kv_heads, head_dim, 8192, torch.float16)
        timings = {}
        for config in PREFILL_CANDIDATES[head_dim]:
            run = functools.partial(flash_attention_prefill, q, k, v, causal=causal, config=config)
            try:
                timings[config] = median_ms(run)
            except Exception as error:  # a config may not fit the card (shared memory)
                print(f"  prefill {config}: {type(error).__name__}")
        best = min(timings, key=timings.get)
        winners[(head_dim, causal)] = best
        print(
            f"tune prefill D={head_dim} causal={causal}: "
            + ", ".join(
                f"{tuple(vars(c).values())}={prefill_tflops(q, causal, t):.0f}" for c, t in timings.items()
            )
            + f" -> {tuple(vars(best).values())}"
        )
    return winners


def bench_prefill(shape, length, causal, dtype, configs) -> dict:
    num_heads, num_kv_heads, head_dim = shape
    q, k, v = prefill_inputs(num_heads, num_kv_heads, head_dim, length, dtype)
    config = configs[(triton.next_power_of_2(head_dim), causal)]
    row = dict(
        heads=f"{num_heads}/{num_kv_heads}",
        head_dim=head_dim,
        batch=q.shape[0],
        length=length,
        causal=causal,
        dtype=str(dtype).removeprefix("torch."),
        ours_config=list(vars(config).values()),
    )
    ours = flash_attention_prefill(q, k, v, causal=causal, config=config)
    row["ours_tflop_s"] = prefill_tflops(
        q, causal, median_ms(lambda: flash_attention_prefill(q, k, v, causal=causal, config=config))
    )
    for name, backend in SDPA.items():
        try:
            fn, note = sdpa_call(backend, q, k, v, causal)
            if name == "sdpa_flash":
                row["max_abs_diff_vs_flash"] = float((ours.float() - fn().float()).abs().max())
            row[f"{name}_tflop_s"] = prefill_tflops(q, causal, median_ms(fn))
            if note:
                row[f"{name}_note"] = note
        except RuntimeError as error:
            row[f"{name}_tflop_s"] = None
            row[f"{name}_note"] = str(error).splitlines()[0][:120]
    return row


# ---------------------------------------------------------------- decode


def decode_sets(batch, length, num_heads, num_kv_heads, head_dim, l2_bytes):
    """Input sets that rotate; each holds one pool read as paged, contiguous and [B, Hkv, N, D] views."""
    kv_bytes = 2 * batch * length * num_kv_heads * head_dim * 2
    count = max(1, min(256, math.ceil(4 * l2_bytes / kv_bytes)))
    blocks = batch * length // BLOCK_SIZE
    sets = []
    for _ in range(count):
        pool_k, pool_v = (
            torch.randn(blocks, BLOCK_SIZE, num_kv_heads * head_dim, device="cuda", dtype=torch.float16)
            for _ in range(2)
        )
        dense = [p.view(batch, length, num_kv_heads, head_dim).transpose(1, 2) for p in (pool_k, pool_v)]
        sets.append(
            dict(
                q=torch.randn(batch, 1, num_heads * head_dim, device="cuda", dtype=torch.float16),
                k_cache=pool_k,
                v_cache=pool_v,
                dense_k=dense[0],
                dense_v=dense[1],
                contig=torch.arange(blocks, device="cuda", dtype=torch.int32).view(batch, -1),
                paged=torch.randperm(blocks, device="cuda").int().view(batch, -1),
            )
        )
    lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    return sets, lens, kv_bytes


def rotate(calls):
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def ours_decode(s, table, lens, num_heads, num_kv_heads, config):
    past = lens - 1
    return lambda: flash_attention_decode(
        s["q"],
        s["k_cache"],
        s["v_cache"],
        s[table],
        past,
        lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        causal=True,
        config=config,
    )


def ours_decode_calls(sets, table, lens, num_heads, num_kv_heads, config):
    return [ours_decode(s, table, lens, num_heads, num_kv_heads, config) for s in sets], ""


def tune_decode(l2_bytes) -> dict:
    winners = {}
    for num_heads, num_kv_heads, head_dim in DECODE_HEADS:
        sets, lens, kv_bytes = decode_sets(1, 32768, num_heads, num_kv_heads, head_dim, l2_bytes)
        timings = {}
        for config in DECODE_CANDIDATES[head_dim]:
            try:
                fn = rotate([ours_decode(s, "paged", lens, num_heads, num_kv_heads, config) for s in sets])
                timings[config] = median_ms(fn)
            except Exception as error:  # a config may not fit the card
                print(f"  decode {config}: {type(error).__name__}")
        best = min(timings, key=timings.get)
        winners[head_dim] = best
        print(
            f"tune decode D={head_dim}: "
            + ", ".join(f"{tuple(vars(c).values())}={kv_bytes / t / 1e6:.0f}GB/s" for c, t in timings.items())
            + f" -> {tuple(vars(best).values())}"
        )
        del sets
    return winners


def bench_decode(batch, length, shape, configs, l2_bytes, copy_gb_s) -> dict:
    num_heads, num_kv_heads, head_dim = shape
    sets, lens, kv_bytes = decode_sets(batch, length, num_heads, num_kv_heads, head_dim, l2_bytes)
    floor_bytes = kv_bytes + 2 * batch * num_heads * head_dim * 2
    config = configs[triton.next_power_of_2(head_dim)]
    row = dict(
        heads=f"{num_heads}/{num_kv_heads}",
        head_dim=head_dim,
        batch=batch,
        length=length,
        dtype="float16",
        input_sets=len(sets),
        floor_bytes=floor_bytes,
        ours_config=list(vars(config).values()),
    )
    providers = {
        f"ours_{table}": functools.partial(
            ours_decode_calls, sets, table, lens, num_heads, num_kv_heads, config
        )
        for table in ("paged", "contig")
    }
    for name, backend in SDPA.items():
        providers[name] = functools.partial(sdpa_decode_calls, backend, sets, num_heads, head_dim)
    ours = providers["ours_contig"]()[0][0]().float().view(batch, num_heads, head_dim)
    for name, make_calls in providers.items():  # one provider's inputs (maybe expanded KV) at a time
        calls = None
        try:
            calls, note = make_calls()
            if note:
                row[f"{name}_note"] = note
            if name == "sdpa_flash":
                flash = calls[0]().float().transpose(1, 2).reshape(batch, num_heads, head_dim)
                row["max_abs_diff_vs_flash"] = float((ours - flash).abs().max())
            row[f"{name}_gb_s"] = floor_bytes / median_ms(rotate(calls)) / 1e6
            row[f"{name}_copy_fraction"] = row[f"{name}_gb_s"] / copy_gb_s
            graph_ms = do_bench_cudagraph(rotate(calls), rep=40, return_mode="median")
            row[f"{name}_graph_gb_s"] = floor_bytes / graph_ms / 1e6
        except RuntimeError as error:  # unsupported by the backend, out of memory, or not capturable
            row.setdefault(f"{name}_gb_s", None)
            row[f"{name}_note"] = str(error).splitlines()[0][:120]
        del calls
        torch.cuda.empty_cache()
    return row


def sdpa_decode_calls(backend, sets, num_heads, head_dim):
    """SDPA over each set's [B, Hkv, N, D] views of the pool (decode: is_causal=False); (calls, note)."""
    calls, note = [], ""
    for s in sets:
        batch = s["q"].shape[0]
        q = s["q"].view(batch, 1, num_heads, head_dim).transpose(1, 2)
        fn, note = sdpa_call(backend, q, s["dense_k"], s["dense_v"], causal=False)
        calls.append(fn)
    return calls, note


# ---------------------------------------------------------------- report


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(
        gpu=props.name,
        sms=props.multi_processor_count,
        l2_bytes=props.L2_cache_size,
        memory_gib=round(props.total_memory / 2**30, 1),
        host=platform.node(),
        platform=platform.platform(),
    )


def versions() -> dict:
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
    )


def print_tables(prefill: list[dict], decode: list[dict], ceilings: dict) -> None:
    copy, gemm = ceilings["copy_gb_s"], ceilings["gemm_bf16_tflop_s"]
    print(f"\nceilings: copy {copy:.0f} GB/s, bf16 GEMM {gemm:.0f} TFLOP/s")
    print("\nprefill TFLOP/s (64k tokens)")
    columns = ("ours", "flash", "cudnn", "eff")
    print(
        f"{'heads':>6} {'D':>4} {'N':>6} {'causal':>6} {'dtype':>8} "
        + " ".join(f"{c:>6}" for c in columns)
        + " ours/cudnn"
    )
    for r in prefill:
        cells = [r.get(f"{p}_tflop_s") for p in ("ours", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")]
        ratio = r["ours_tflop_s"] / cells[2] if cells[2] else float("nan")
        print(
            f"{r['heads']:>6} {r['head_dim']:>4} {r['length']:>6} {r['causal']!s:>6} {r['dtype']:>8} "
            + " ".join(f"{c:6.0f}" if c else f"{'-':>6}" for c in cells)
            + f" {ratio:10.2f}"
        )
    print("\ndecode GB/s (fp16, one query token; graph-replayed in brackets)")
    names = ("ours_paged", "ours_contig", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
    print(f"{'heads':>6} {'D':>4} {'B':>3} {'N':>6} " + " ".join(f"{n:>15}" for n in names) + "  paged/copy")
    for r in decode:
        cells = []
        for n in names:
            value, graph = r.get(f"{n}_gb_s"), r.get(f"{n}_graph_gb_s")
            cells.append(f"{value:6.0f} ({graph:6.0f})" if value and graph else f"{value or 0:6.0f} (     -)")
        print(
            f"{r['heads']:>6} {r['head_dim']:>4} {r['batch']:>3} {r['length']:>6} "
            + " ".join(cells)
            + f"  {r['ours_paged_copy_fraction']:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention_gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--tune", action="store_true", help="time the candidate tile configs first and use the best"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    torch.manual_seed(0)
    report = dict(
        benchmark="Triton FlashAttention-2 prefill and split-KV decode vs SDPA flash / cuDNN / efficient",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python -m benchmarks.attention_gpu", *(sys.argv[1:] if argv is None else argv)]),
        machine=machine(),
        versions=versions(),
        note="Medians of triton.testing.do_bench (L2 flushed before each call). End-to-end decode tokens/s "
        "is not measured: the GPU serving backend does not exist yet.",
    )
    print(report["machine"], report["versions"])
    report["ceilings"] = ceilings = measure_ceilings()
    l2_bytes = report["machine"]["l2_bytes"]
    prefill_configs, decode_configs = dict(PREFILL_CONFIGS), dict(DECODE_CONFIGS)
    if args.tune:
        prefill_configs.update(tune_prefill())
        decode_configs.update(tune_decode(l2_bytes))
    report["configs"] = dict(
        prefill={f"D{d} causal={c}": list(vars(cfg).values()) for (d, c), cfg in prefill_configs.items()},
        decode={f"D{d}": list(vars(cfg).values()) for d, cfg in decode_configs.items()},
        fields=dict(
            prefill="block_m, block_n, num_warps, num_stages", decode="block_n, num_warps, num_stages"
        ),
    )
    report["prefill"], report["decode"] = prefill, decode = [], []
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for shape, length, causal, dtype in itertools.product(
        PREFILL_HEADS, PREFILL_LENGTHS, [False, True], [torch.float16, torch.bfloat16]
    ):
        prefill.append(bench_prefill(shape, length, causal, dtype, prefill_configs))
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in prefill[-1].items()}, flush=True)
        save()
        torch.cuda.empty_cache()
    for shape, batch, length in itertools.product(DECODE_HEADS, DECODE_BATCHES, DECODE_LENGTHS):
        decode.append(bench_decode(batch, length, shape, decode_configs, l2_bytes, ceilings["copy_gb_s"]))
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in decode[-1].items()}, flush=True)
        save()
    print_tables(prefill, decode, ceilings)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
