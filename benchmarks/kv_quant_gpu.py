"""Quantized KV decode and Sage-style quantized prefill vs their fp16 baselines, one GPU, one process.

    python -m benchmarks.kv_quant_gpu [--quick] [--no-tune] [--decode-only] [--out PATH]

- **decode**: one query token per row, B in {1, 8}, N in {8k, 32k}, 32 query / 8 KV heads of 128, fp16
  q. Providers: ``fp16`` (kernels/attention_triton_decode.py over an fp16 pool), ``int8`` and ``int4``
  (kernels/attention_triton_quant.py over the same pool quantized by its write path). Each call
  rotates over enough pools that the KV in flight is >= 4x the L2 size, through a shuffled block table
  (16-token blocks). Time per call = the median over 15 replays of a CUDA graph of 20 calls, timed
  with CUDA events (decode runs from CUDA graphs in serving; eager launch overhead would swamp the
  int4 kernel at B=1 N=8k). GB/s counts what a call must read and write: codes + scales (or fp16 K/V),
  q and o. Cosine: o of each quantized format vs the fp16 kernel's o on the same pool, flattened.
- **prefill**: B * N = 32k tokens, N in {4k, 8k, 16k}, 32/8 heads of 128, fp16, causal and not.
  Providers: ``sage_fp8`` (kernels/attention_sage.py with FP8 P.V; int8 Q.K), ``sage_fp16pv`` (int8
  Q.K, fp16 P.V), ``ours_fp16`` (kernels/attention_triton_prefill.py) and ``cudnn_fp16`` (SDPA pinned to
  CUDNN_ATTENTION, enable_gqa). The Sage times include quantizing q, k and v (the whole call). TFLOP/s
  (TOPS for Sage) = 4 * B * Hq * N^2 * D / t, halved when causal; median of 20 CUDA-event timings
  after warm-up. Cosine: each output vs cuDNN's, per (batch, head), the minimum.
- ``--no-tune`` skips timing QUANT_CANDIDATES (decode, B=8 N=32k) and SAGE_CANDIDATES (N=8k) first.
- ``--decode-only`` runs the decode part and keeps the prefill rows of the results file it rewrites,
  under ``prefill_environment`` / ``prefill_command`` (the run that measured them).
Results go to benchmarks/results/kv_quant_gpu.json with the card, date, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention_sage import SAGE_CANDIDATES, SAGE_CONFIGS, sage_attention
from kernels.attention_triton_decode import flash_attention_decode
from kernels.attention_triton_prefill import flash_attention_prefill
from kernels.attention_triton_quant import (
    QUANT_CANDIDATES,
    QUANT_DECODE_CONFIGS,
    flash_attention_decode_quant,
    write_kv_cache_quant,
)
from kernels.kv_formats import code_width, group_size

RESULTS = Path(__file__).resolve().parent / "results" / "kv_quant_gpu.json"
HEADS = (32, 8, 128)  # Hq, Hkv, D
BLOCK_SIZE = 16
DECODE_BATCHES = [1, 8]
DECODE_LENGTHS = [8192, 32768]
PREFILL_TOKENS = 32768
PREFILL_LENGTHS = [4096, 8192, 16384]
FORMATS = ("int8", "int4")


def median_event_ms(fn, *, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms_per_call(calls, *, per_graph: int = 20, replays: int = 15) -> float:
    """Median time of one call, from a CUDA graph of `per_graph` calls rotating over `calls`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:per_graph]:
            fn()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            calls[i % len(calls)]()
    return median_event_ms(graph.replay, reps=replays, warmup=2) / per_graph


# ---------------------------------------------------------------- decode


def decode_pools(batch: int, length: int, l2_bytes: int) -> tuple[list[dict], dict]:
    """Pools that rotate: each an fp16 pool and its int8 and int4 quantizations (write path, k_mean 0)."""
    num_heads, num_kv_heads, head_dim = HEADS
    width = num_kv_heads * head_dim
    tokens = batch * length
    int4_bytes = tokens * 2 * (code_width("int4", width) + 2 * width // group_size("int4", head_dim))
    count = max(1, min(64, math.ceil(4 * l2_bytes / int4_bytes)))
    blocks = tokens // BLOCK_SIZE
    slots = torch.arange(tokens, device="cuda").view(1, tokens)
    sets = []
    for _ in range(count):
        s = dict(q=torch.randn(batch, 1, num_heads * head_dim, device="cuda", dtype=torch.float16))
        k, v = (torch.randn(blocks, BLOCK_SIZE, width, device="cuda", dtype=torch.float16) for _ in range(2))
        s["fp16"] = (k, v)
        for fmt in FORMATS:
            group = group_size(fmt, head_dim)
            codes_dtype = torch.int8 if fmt == "int8" else torch.uint8
            pools = [torch.empty(blocks, BLOCK_SIZE, code_width(fmt, width), device="cuda", dtype=codes_dtype)
                     for _ in range(2)]  # fmt: skip
            pools += [torch.empty(blocks, BLOCK_SIZE, width // group, device="cuda", dtype=torch.float16)
                      for _ in range(2)]  # fmt: skip
            zero_mean = torch.zeros(width, device="cuda", dtype=torch.float16)
            write_kv_cache_quant(k.view(1, tokens, width), v.view(1, tokens, width), zero_mean, *pools, slots,
                                 kv_format=fmt, head_dim=head_dim)  # fmt: skip
            s[fmt] = tuple(pools)
        s["table"] = torch.randperm(blocks, device="cuda").int().view(batch, -1)
        sets.append(s)
    lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    return sets, dict(lens=lens, past=lens - 1, count=count)


def decode_call(s: dict, provider: str, meta: dict, config=None):
    num_heads, num_kv_heads, _ = HEADS
    common = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, causal=True)
    if provider == "fp16":
        k, v = s["fp16"]
        return lambda: flash_attention_decode(s["q"], k, v, s["table"], meta["past"], meta["lens"], **common)
    pools = s[provider]
    return lambda: flash_attention_decode_quant(
        s["q"], *pools, s["table"], meta["past"], meta["lens"], kv_format=provider, config=config, **common
    )


def decode_bytes(batch: int, length: int, provider: str) -> int:
    num_heads, num_kv_heads, head_dim = HEADS
    width = num_kv_heads * head_dim
    if provider == "fp16":
        per_token = 2 * width * 2
    else:
        per_token = 2 * (code_width(provider, width) + 2 * width // group_size(provider, head_dim))
    return batch * length * per_token + 2 * batch * num_heads * head_dim * 2


def tune_decode(l2_bytes: int, record: dict) -> dict:
    """The fastest QUANT_CANDIDATES config per format at B=8 N=32k; every timing goes to record."""
    sets, meta = decode_pools(8, 32768, l2_bytes)
    best = {}
    for fmt in FORMATS:
        timings = []
        for config in QUANT_CANDIDATES[fmt]:
            try:
                ms = graph_ms_per_call([decode_call(s, fmt, meta, config) for s in sets])
                timings.append((ms, config))
            except Exception as e:  # a config that does not compile or fit (shared memory) is skipped
                print(f"tune {fmt} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        ms, config = min(timings, key=lambda t: t[0])
        best[fmt] = config
        record[fmt] = [dict(vars(c), us=t * 1e3) for t, c in timings]
        cells = ", ".join(f"{tuple(vars(c).values())}: {t * 1e3:.1f}" for t, c in timings)
        print(f"tune decode {fmt}: best {config} {ms * 1e3:.1f} us ({cells})", flush=True)
    del sets
    torch.cuda.empty_cache()
    return best


def bench_decode(batch: int, length: int, configs: dict, l2_bytes: int) -> dict:
    sets, meta = decode_pools(batch, length, l2_bytes)
    row = dict(batch=batch, length=length, heads=list(HEADS), pools=meta["count"])
    outputs = {}
    for provider in ("fp16", *FORMATS):
        calls = [decode_call(s, provider, meta, configs.get(provider)) for s in sets]
        outputs[provider] = calls[0]().float()
        ms = graph_ms_per_call(calls)
        row[f"{provider}_us"] = ms * 1e3
        row[f"{provider}_gb_s"] = decode_bytes(batch, length, provider) / ms / 1e6
    for fmt in FORMATS:
        row[f"{fmt}_speedup"] = row["fp16_us"] / row[f"{fmt}_us"]
        row[f"{fmt}_cosine"] = F.cosine_similarity(
            outputs[fmt].flatten(), outputs["fp16"].flatten(), dim=0
        ).item()
    del sets
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- prefill


def prefill_inputs(length: int):
    num_heads, num_kv_heads, head_dim = HEADS
    batch = PREFILL_TOKENS // length
    q = torch.randn(batch, num_heads, length, head_dim, device="cuda", dtype=torch.float16)
    k, v = (
        torch.randn(batch, num_kv_heads, length, head_dim, device="cuda", dtype=torch.float16) for _ in "kv"
    )
    k += 2 * torch.randn(1, num_kv_heads, 1, head_dim, device="cuda", dtype=torch.float16)  # channel offsets
    return q, k, v


def prefill_calls(q, k, v, causal: bool, sage_config=None) -> dict:
    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return dict(
        sage_fp8=lambda: sage_attention(q, k, v, causal=causal, pv="fp8", config=sage_config),
        sage_fp16pv=lambda: sage_attention(q, k, v, causal=causal, pv="fp16", config=sage_config),
        ours_fp16=lambda: flash_attention_prefill(q, k, v, causal=causal),
        cudnn_fp16=cudnn,
    )


def tflops(q, causal: bool, ms: float) -> float:
    batch, num_heads, length, head_dim = q.shape
    return 4 * batch * num_heads * length**2 * head_dim / (2 if causal else 1) / ms / 1e9


def tune_sage() -> dict:
    q, k, v = prefill_inputs(8192)
    timings = []
    for config in SAGE_CANDIDATES:
        try:
            ms = median_event_ms(lambda c=config: sage_attention(q, k, v, causal=False, pv="fp8", config=c))
            timings.append((ms, config))
        except Exception as e:
            print(f"tune sage {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    ms, config = min(timings, key=lambda t: t[0])
    print(f"tune sage: best {config} ({', '.join(f'{c}: {tflops(q, False, t):.0f}' for t, c in timings)})",
          flush=True)  # fmt: skip
    return config


def bench_prefill(length: int, causal: bool, sage_config) -> dict:
    q, k, v = prefill_inputs(length)
    row = dict(batch=q.shape[0], length=length, causal=causal, heads=list(HEADS))
    outputs = {}
    for name, fn in prefill_calls(q, k, v, causal, sage_config).items():
        try:
            outputs[name] = fn().float()
            row[f"{name}_tflop_s"] = tflops(q, causal, median_event_ms(fn))
        except Exception as e:  # one provider failing must not lose the others
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    ref = outputs.get("cudnn_fp16")
    for name, out in outputs.items():
        if ref is not None and name != "cudnn_fp16":
            row[f"{name}_cosine_min"] = (
                F.cosine_similarity(out.flatten(2), ref.flatten(2), dim=-1).min().item()
            )
    if "sage_fp8_tflop_s" in row and "cudnn_fp16_tflop_s" in row:
        row["sage_fp8_vs_cudnn"] = row["sage_fp8_tflop_s"] / row["cudnn_fp16_tflop_s"]
        row["sage_fp8_vs_ours"] = row["sage_fp8_tflop_s"] / row.get("ours_fp16_tflop_s", float("nan"))
    del q, k, v, outputs
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- report


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(
        gpu=props.name, capability=list(torch.cuda.get_device_capability()), sms=props.multi_processor_count,
        l2_bytes=props.L2_cache_size, python=platform.python_version(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip


def guarded(results: dict, key: str, fn, *args):
    """fn(*args); a failure is recorded in results["errors"] and the run goes on."""
    try:
        return fn(*args)
    except Exception:
        results.setdefault("errors", {})[key] = traceback.format_exc()[-2000:]
        print(f"{key} failed:\n{results['errors'][key]}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tune", action="store_true", help="use the kernels' config tables as they are")
    parser.add_argument("--quick", action="store_true", help="N=8k decode and N=4k prefill only")
    parser.add_argument("--decode-only", action="store_true", help="keep the results file's prefill rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = environment()
    results = dict(
        environment=env, command="python -m benchmarks.kv_quant_gpu " + " ".join(argv or sys.argv[1:])
    )
    l2 = env["l2_bytes"]
    decode_configs = dict(QUANT_DECODE_CONFIGS)
    sage_config = SAGE_CONFIGS[HEADS[2]]
    if not args.no_tune:
        tuning = results.setdefault("decode_tuning_B8_N32768", {})
        decode_configs = guarded(results, "tune_decode", tune_decode, l2, tuning) or decode_configs
        if not args.decode_only:
            sage_config = guarded(results, "tune_sage", tune_sage) or sage_config
    results["configs"] = dict(decode={f: vars(c) for f, c in decode_configs.items()}, sage=vars(sage_config))
    results["decode"], results["prefill"] = [], []
    lengths = DECODE_LENGTHS[:1] if args.quick else DECODE_LENGTHS
    for batch in DECODE_BATCHES:
        for length in lengths:
            row = guarded(
                results, f"decode_B{batch}_N{length}", bench_decode, batch, length, decode_configs, l2
            )
            if row:
                results["decode"].append(row)
                print(json.dumps(row), flush=True)
    if args.decode_only:
        keep = json.loads(args.out.read_text()) if args.out.exists() else {}
        results["configs"]["sage"] = keep.get("configs", {}).get("sage")
        results["prefill"] = keep.get("prefill", [])
        results["prefill_environment"] = keep.get("prefill_environment", keep.get("environment"))
        results["prefill_command"] = keep.get("prefill_command", keep.get("command"))
    for length in [] if args.decode_only else PREFILL_LENGTHS[:1] if args.quick else PREFILL_LENGTHS:
        for causal in (True, False):
            row = guarded(results, f"prefill_N{length}_{causal}", bench_prefill, length, causal, sage_config)
            if row:
                results["prefill"].append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
