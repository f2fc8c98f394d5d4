"""Our FlashAttention CPU kernel vs ONNX Runtime's own ``ai.onnx Attention`` (opset 23), same shapes.

    python -m kernels.attention_cpu build
    python -m benchmarks.attention_cpu [--modes hot cold] [--threads 1 2] [--seconds 1.0]
        [--library SO] [--baseline SO] [--no-spin]

GQA with 9 query heads and 3 KV heads, head_dim 64, causal, float32 activations. Two tables:

- **hot**: one node called again and again, so its KV cache stays in the CPU caches. Decode (S=1) with
  B=1 at past 128/512/2048/4096 and B=8 at past 512, and prefill with B=1, past 0, S=128/512/2048.
- **cold**: decode as a real model runs it. A graph of 30 nodes (one per layer) in a chain, the output
  of one being the query of the next, each over its own pools: by the time a layer's cache is read again
  it has long left the caches, so every call streams the KV cache from DRAM (30 layers at past 2048 hold
  190 MB of fp32 K/V). B=1 at past 512/2048/4096 and B=8 at past 512, with an fp32 KV cache and with an
  fp16 one (``kv_format="fp16"``, fp32 activations). The figures are per layer: the graph's median time
  / 30, and GB/s = the K and V bytes a layer reads (2 * B * (past + 1) * 3 * 64 * itemsize) / that time.

- **ours**: ``fastattention::FlashAttention`` over a paged pool (block_size 16, shuffled blocks). Each pool
  is bound as both input and output through IO binding, so the kernel updates it in place, as the runtime
  does. ``--library`` times another build of the kernel instead of the built one; ``--baseline`` times
  another build (say, the previous commit's) beside it, in the same run (fp32 KV only in the cold table).
- **ORT**: ``Attention`` with ``past_key/past_value`` [B, 3, P, 64] (dense, contiguous, fp32). It must
  write ``present_key/value`` [B, 3, P+S, 64], a copy of the whole cache, on every call. It has no fp16-KV
  form with fp32 activations, so the fp16 rows of the cold table have no ORT figure.

Every input and output of both is a pre-allocated OrtValue bound once, so a timed call is
``run_with_iobinding`` alone. Each figure is the median of repeated calls. Both ops see the same
numbers, and the tables print max|ours - ORT| as a check that they do the same work (for fp16 KV that
difference includes the fp16 rounding of the cache). Results go to benchmarks/results/attention_cpu.json
with the machine, date, load average, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from kernels import attention_cpu

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
SCALE = HEAD_DIM**-0.5
LAYERS = 30  # cold table: layers of the chain, each with its own pools
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TENSOR_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
RESULTS = Path(__file__).resolve().parent / "results" / "attention_cpu.json"


@dataclass(frozen=True)
class Shape:
    batch: int
    new_tokens: int
    past: int

    @property
    def name(self) -> str:
        kind = "decode" if self.new_tokens == 1 else "prefill"
        return f"{kind} B={self.batch} S={self.new_tokens} past={self.past}"


SHAPES = [
    Shape(1, 1, 128),
    Shape(1, 1, 512),
    Shape(1, 1, 2048),
    Shape(1, 1, 4096),
    Shape(8, 1, 512),
    Shape(1, 128, 0),
    Shape(1, 512, 0),
    Shape(1, 2048, 0),
]
COLD_SHAPES = [Shape(1, 1, 512), Shape(1, 1, 2048), Shape(1, 1, 4096), Shape(8, 1, 512)]


def flash_attention_model(layers: int = 1, kv_format: str = "fp32") -> onnx.ModelProto:
    """`layers` FlashAttention nodes in a chain (node i's output is node i+1's query), each with its
    own pools ``k_cache.i``/``v_cache.i`` (outputs ``k_cache_out.i``/``v_cache_out.i``); the last
    output is ``o``."""
    shared = ["k", "v"]
    index = ["block_table", "slot_mapping", "past_lens", "total_lens"]
    nodes, pools = [], []
    for i in range(layers):
        query = "q" if i == 0 else f"o.{i - 1}"
        out = "o" if i == layers - 1 else f"o.{i}"
        inputs = [query, *shared, f"k_cache.{i}", f"v_cache.{i}", *index]
        outputs = [out, f"k_cache_out.{i}", f"v_cache_out.{i}"]
        pools += [(f"k_cache.{i}", f"k_cache_out.{i}"), (f"v_cache.{i}", f"v_cache_out.{i}")]
        nodes.append(
            helper.make_node(
                "FlashAttention",
                inputs,
                outputs,
                domain="fastattention",
                num_heads=NUM_HEADS,
                num_kv_heads=NUM_KV_HEADS,
                scale=SCALE,
                causal=1,
                sliding_window=0,
                kv_format=kv_format,
            )
        )
    kv_type, float_type = TENSOR_TYPES[kv_format], TensorProto.FLOAT
    types = dict(block_table=TensorProto.INT32, slot_mapping=TensorProto.INT64)
    types.update(past_lens=TensorProto.INT32, total_lens=TensorProto.INT32)
    inputs = [
        helper.make_tensor_value_info(n, types.get(n, float_type), None) for n in ["q", *shared, *index]
    ]
    inputs += [helper.make_tensor_value_info(pool, kv_type, None) for pool, _ in pools]
    outputs = [helper.make_tensor_value_info("o", float_type, None)]
    outputs += [helper.make_tensor_value_info(out, kv_type, None) for _, out in pools]
    graph = helper.make_graph(nodes, "flash_attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("fastattention", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def ort_attention_model(layers: int = 1) -> onnx.ModelProto:
    """The same chain of ``Attention`` nodes, over ``past_key.i``/``past_value.i``."""
    nodes = []
    for i in range(layers):
        query = "q" if i == 0 else f"o.{i - 1}"
        out = "o" if i == layers - 1 else f"o.{i}"
        nodes.append(
            helper.make_node(
                "Attention",
                [query, "k", "v", "", f"past_key.{i}", f"past_value.{i}"],
                [out, f"present_key.{i}", f"present_value.{i}"],
                q_num_heads=NUM_HEADS,
                kv_num_heads=NUM_KV_HEADS,
                is_causal=1,
                scale=SCALE,
            )
        )
    names = ["q", "k", "v"] + [f"{kind}.{i}" for i in range(layers) for kind in ("past_key", "past_value")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    names = ["o"] + [f"{kind}.{i}" for i in range(layers) for kind in ("present_key", "present_value")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    graph = helper.make_graph(nodes, "attention23", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def make_inputs(shape: Shape, rng: np.random.Generator) -> tuple[dict, dict]:
    """Feeds of both models for the same keys: a shuffled paged pool for ours, dense past for ORT."""
    B, S, P, width = shape.batch, shape.new_tokens, shape.past, NUM_KV_HEADS * HEAD_DIM
    blocks_per_row = (P + S + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = B * blocks_per_row
    block_table = rng.permutation(num_blocks).astype(np.int32).reshape(B, blocks_per_row)
    positions = P + np.arange(S)
    slot_mapping = (
        block_table[:, positions // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
    )
    randn = lambda *dims: rng.standard_normal(dims, dtype=np.float32)  # noqa: E731
    q, k, v = randn(B, S, NUM_HEADS * HEAD_DIM), randn(B, S, width), randn(B, S, width)
    k_cache, v_cache = randn(num_blocks, BLOCK_SIZE, width), randn(num_blocks, BLOCK_SIZE, width)
    past_slots = block_table[:, np.arange(P) // BLOCK_SIZE] * BLOCK_SIZE + np.arange(P) % BLOCK_SIZE

    def dense_past(pool: np.ndarray) -> np.ndarray:  # [B, Hkv, P, D]
        rows = pool.reshape(-1, width)[past_slots]
        return np.ascontiguousarray(rows.reshape(B, P, NUM_KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3))

    ours = dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, block_table=block_table)
    ours.update(
        slot_mapping=slot_mapping, past_lens=np.full(B, P, np.int32), total_lens=np.full(B, P + S, np.int32)
    )
    theirs = dict(q=q, k=k, v=v, past_key=dense_past(k_cache), past_value=dense_past(v_cache))
    return ours, theirs


def bind(session: ort.InferenceSession, feeds: dict, outputs: dict) -> ort.IOBinding:
    """Bind every input once; outputs named in `outputs` are bound to those OrtValues (maybe an input's)."""
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name, source in outputs.items():
        value = values[source] if isinstance(source, str) else ort.OrtValue.ortvalue_from_numpy(source)
        binding.bind_ortvalue_output(name, value)
    return binding


def median_ms(session: ort.InferenceSession, binding: ort.IOBinding, seconds: float) -> tuple[float, int]:
    for _ in range(3):
        session.run_with_iobinding(binding)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, len(times)


@dataclass(frozen=True)
class Threads:
    count: int  # intra_op_num_threads
    spin: bool = True  # session.intra_op.allow_spinning: pool threads spin between ops instead of sleeping


def session(model: onnx.ModelProto, threads: Threads, library: Path | None) -> ort.InferenceSession:
    """A session on `threads`; with `library`, that kernel build is registered."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.count
    if not threads.spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kv_bytes(shape: Shape, kv_format: str = "fp32") -> int:
    """K and V bytes one decode call reads: every row's past keys and the new one."""
    itemsize = np.dtype(KV_DTYPES[kv_format]).itemsize
    return 2 * shape.batch * (shape.past + 1) * NUM_KV_HEADS * HEAD_DIM * itemsize


def figure(shape: Shape, ms: float) -> str:
    """Decode: GB/s of K and V streamed. Prefill: GFLOP/s of the causal QK^T and PV."""
    if shape.new_tokens == 1:
        return f"{kv_bytes(shape) / ms / 1e6:.1f} GB/s"
    pairs = shape.new_tokens * (shape.new_tokens + 1) / 2
    return f"{4 * pairs * NUM_HEADS * HEAD_DIM * shape.batch / ms / 1e6:.1f} GFLOP/s"


def measure(
    shape: Shape, threads: Threads, seconds: float, library: Path, baseline: Path | None, seed: int = 0
) -> dict:
    """Hot cache: one node, one pool, called again and again (ours, ORT, and the baseline build if given)."""
    ours_feeds, ort_feeds = make_inputs(shape, np.random.default_rng(seed))
    B, S, P = shape.batch, shape.new_tokens, shape.past
    ours_feeds = rename(ours_feeds, {"k_cache": "k_cache.0", "v_cache": "v_cache.0"})
    ort_feeds = rename(ort_feeds, {"past_key": "past_key.0", "past_value": "past_value.0"})
    o_ort = np.empty((B, S, NUM_HEADS * HEAD_DIM), np.float32)
    present = [np.empty((B, NUM_KV_HEADS, P + S, HEAD_DIM), np.float32) for _ in range(2)]
    theirs = session(ort_attention_model(), threads, None)
    ort_binding = bind(
        theirs, ort_feeds, {"o": o_ort, "present_key.0": present[0], "present_value.0": present[1]}
    )
    ort_ms, ort_calls = median_ms(theirs, ort_binding, seconds)
    ort_out = ort_binding.get_outputs()[0].numpy()
    ours_ms, ours_calls, ours_out = time_ours(shape, ours_feeds, 1, "fp32", threads, library, seconds)
    row = dict(
        shape=shape.name,
        **asdict(shape),
        threads=threads.count,
        ours_ms=round(ours_ms, 4),
        ort_attention23_ms=round(ort_ms, 4),
        speedup=round(ort_ms / ours_ms, 2),
        ours_figure=figure(shape, ours_ms),
        calls=dict(ours=ours_calls, ort=ort_calls),
        max_abs_diff=float(np.abs(ours_out - ort_out).max()),
    )
    if baseline is not None:
        baseline_ms, _, _ = time_ours(shape, ours_feeds, 1, "fp32", threads, baseline, seconds)
        row.update(baseline_ms=round(baseline_ms, 4), speedup_vs_baseline=round(baseline_ms / ours_ms, 2))
    return row


def time_ours(
    shape: Shape, feeds: dict, layers: int, kv_format: str, threads: Threads, library: Path, seconds: float
) -> tuple[float, int, np.ndarray]:
    """Median ms of the chain of `layers` FlashAttention nodes over `feeds` (pools k_cache.i/v_cache.i,
    copied here so that every run starts from the same pools), its calls, and a copy of its output."""
    feeds = {
        name: array.astype(KV_DTYPES[kv_format]) if "_cache." in name else array
        for name, array in feeds.items()
    }
    outputs = {"o": np.empty((shape.batch, shape.new_tokens, NUM_HEADS * HEAD_DIM), np.float32)}
    for i in range(layers):
        outputs.update({f"k_cache_out.{i}": f"k_cache.{i}", f"v_cache_out.{i}": f"v_cache.{i}"})
    ours = session(flash_attention_model(layers, kv_format), threads, library)
    binding = bind(ours, feeds, outputs)
    ms, calls = median_ms(ours, binding, seconds)
    return ms, calls, binding.get_outputs()[0].numpy().copy()


def rename(feeds: dict, names: dict) -> dict:
    return {names.get(name, name): array for name, array in feeds.items()}


def layered_feeds(feeds: dict, names: tuple[str, ...], layers: int) -> dict:
    """`feeds` with each array named in `names` replaced by one copy per layer (name.i)."""
    out = {name: array for name, array in feeds.items() if name not in names}
    for name in names:
        out.update({f"{name}.{i}": feeds[name].copy() for i in range(layers)})
    return out


def measure_cold(
    shape: Shape,
    threads: Threads,
    kv_formats: list[str],
    seconds: float,
    library: Path,
    baseline: Path | None,
    seed: int = 0,
) -> list[dict]:
    """Cold cache: the chain of LAYERS nodes, each over its own pools, and the same Attention-23 chain.
    One row per KV format; the baseline build (if given) is timed on fp32 KV only."""
    ours_feeds, ort_feeds = make_inputs(shape, np.random.default_rng(seed))
    B, S, P = shape.batch, shape.new_tokens, shape.past
    theirs_feeds = layered_feeds(ort_feeds, ("past_key", "past_value"), LAYERS)
    outputs: dict = {"o": np.empty((B, S, NUM_HEADS * HEAD_DIM), np.float32)}
    for i in range(LAYERS):
        for kind in ("present_key", "present_value"):
            outputs[f"{kind}.{i}"] = np.empty((B, NUM_KV_HEADS, P + S, HEAD_DIM), np.float32)
    theirs = session(ort_attention_model(LAYERS), threads, None)
    binding = bind(theirs, theirs_feeds, outputs)
    ort_ms, ort_calls = median_ms(theirs, binding, seconds)
    ort_out = binding.get_outputs()[0].numpy().copy()  # a copy: the bound buffers go away next
    del theirs, binding, theirs_feeds, outputs
    pools = {name: ours_feeds.pop(name) for name in ("k_cache", "v_cache")}
    ours_feeds.update({f"{name}.{i}": pool for name, pool in pools.items() for i in range(LAYERS)})
    rows = []
    for kv_format in kv_formats:
        ms, calls, out = time_ours(shape, ours_feeds, LAYERS, kv_format, threads, library, seconds)
        layer_us = ms * 1e3 / LAYERS
        row = dict(
            shape=shape.name, **asdict(shape), kv_format=kv_format, threads=threads.count, layers=LAYERS
        )
        row.update(
            ours_us_per_layer=round(layer_us, 1),
            ours_gb_per_s=round(kv_bytes(shape, kv_format) / layer_us / 1e3, 2),
        )
        if kv_format == "fp32":
            row.update(
                ort_attention23_us_per_layer=round(ort_ms * 1e3 / LAYERS, 1), speedup=round(ort_ms / ms, 2)
            )
            if baseline is not None:
                base_ms, _, _ = time_ours(shape, ours_feeds, LAYERS, kv_format, threads, baseline, seconds)
                row.update(
                    baseline_us_per_layer=round(base_ms * 1e3 / LAYERS, 1),
                    speedup_vs_baseline=round(base_ms / ms, 2),
                )
        row.update(calls=dict(ours=calls, ort=ort_calls), max_abs_diff=float(np.abs(out - ort_out).max()))
        rows.append(row)
    return rows


def machine() -> dict:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = models[0] if models else cpu
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    return dict(
        platform=platform.platform(),
        machine=platform.machine(),
        cpu=cpu,
        cores=os.cpu_count(),
        load_average=load,
    )


ROW = "{:<30} {:>3} {:>9} {:>10} {:>8} {:>16} {:>9} {:>9}"
COLD_ROW = "{:<26} {:>4} {:>3} {:>11} {:>7} {:>11} {:>8} {:>9} {:>9}"


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_row(r: dict) -> None:
    cells = [r["shape"], r["threads"], cell(r["ours_ms"], ".3f"), cell(r["ort_attention23_ms"], ".3f")]
    cells += [cell(r["speedup"], ".2f"), r["ours_figure"], cell(r["max_abs_diff"], ".1e")]
    print(ROW.format(*cells, cell(r.get("baseline_ms"), ".3f")))


def print_cold_row(r: dict) -> None:
    cells = [r["shape"], r["kv_format"], r["threads"], cell(r["ours_us_per_layer"], ".1f")]
    cells += [cell(r["ours_gb_per_s"], ".1f"), cell(r.get("ort_attention23_us_per_layer"), ".1f")]
    cells += [cell(r.get("speedup"), ".2f"), cell(r["max_abs_diff"], ".1e")]
    print(COLD_ROW.format(*cells, cell(r.get("baseline_us_per_layer"), ".1f")))


def versions() -> dict:
    gxx = shutil.which("g++")
    compiler = (
        subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        if gxx
        else "?"
    )
    return dict(
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        onnx=onnx.__version__,
        numpy=np.__version__,
        kernel_compiler=compiler,
        kernel_flags=" ".join(attention_cpu.CXXFLAGS),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention_cpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["hot", "cold"], default=["hot", "cold"], help="tables to run"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra_op_num_threads values")
    parser.add_argument(
        "--kv-formats", nargs="+", choices=list(KV_DTYPES), default=list(KV_DTYPES), help="cold: KV caches"
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per op, shape, thread count")
    parser.add_argument("--library", type=Path, help="kernel .so to time (default: the built one)")
    parser.add_argument(
        "--baseline", type=Path, help="another build of the kernel (say, the previous one) to time beside it"
    )
    parser.add_argument(
        "--no-spin",
        action="store_true",
        help="session.intra_op.allow_spinning=0: pool threads sleep instead of spinning between ops",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    library = args.library or attention_cpu.library_path()
    if library is None:
        raise SystemExit("the kernel library is not built: run `python -m kernels.attention_cpu build` first")
    info = machine()
    print(f"device: {info['cpu']} ({info['cores']} cores), load average {' '.join(info['load_average'])}")
    print(f"kernel: {library}, intra-op spinning {'off' if args.no_spin else 'on'}")
    print(
        f"num_heads={NUM_HEADS}, num_kv_heads={NUM_KV_HEADS}, head_dim={HEAD_DIM}, causal, fp32 activations"
    )
    hot, cold = [], []
    if "hot" in args.modes:
        print("hot cache (one node, fp32 KV):")
        print(ROW.format("shape", "thr", "ours ms", "ORT-23 ms", "speedup", "ours", "max|diff|", "base ms"))
        for shape in SHAPES:
            for threads in args.threads:
                threading = Threads(threads, not args.no_spin)
                hot.append(measure(shape, threading, args.seconds, library, args.baseline))
                print_row(hot[-1])
    if "cold" in args.modes:
        print(f"cold cache ({LAYERS} layers, each with its own pools; per layer):")
        header = ["shape", "kv", "thr", "ours us", "GB/s", "ORT-23 us", "speedup", "max|diff|", "base us"]
        print(COLD_ROW.format(*header))
        for shape in COLD_SHAPES:
            for threads in args.threads:
                threading = Threads(threads, not args.no_spin)
                rows = measure_cold(shape, threading, args.kv_formats, args.seconds, library, args.baseline)
                for row in rows:
                    print_cold_row(row)
                cold += rows
    report = dict(
        benchmark="FlashAttention CPU kernel vs ai.onnx Attention-23",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python -m benchmarks.attention_cpu", *(sys.argv[1:] if argv is None else argv)]),
        machine=info,
        load_average_after=machine()["load_average"],
        versions=versions(),
        kernel_library=str(library),
        baseline_library=str(args.baseline) if args.baseline else None,
        intra_op_allow_spinning=not args.no_spin,
        config=dict(
            num_heads=NUM_HEADS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            block_size=BLOCK_SIZE,
            layers=LAYERS,
        ),
        note="Median per call. The machine was shared with other work during the run, so treat the figures "
        "as indicative. Ours updates its pools in place (IO binding). ORT writes present_key/value. "
        "hot: one node, its cache stays in the CPU caches. cold: a chain of `layers` nodes with their own "
        "pools, figures per layer; GB/s counts the K and V bytes read.",
        hot=hot,
        cold=cold,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
