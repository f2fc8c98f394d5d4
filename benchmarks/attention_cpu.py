"""Our FlashAttention CPU kernel vs ONNX Runtime's own ``ai.onnx Attention`` (opset 23), same shapes.

    python -m kernels.attention_cpu build
    python -m benchmarks.attention_cpu [--threads 1 2] [--seconds 1.0]

GQA with 9 query heads and 3 KV heads, head_dim 64, float32, causal. The shapes are decode (S=1) with
B=1 at past 128/512/2048/4096 and B=8 at past 512, and prefill with B=1, past 0, S=128/512/2048.

- **ours**: one ``fastattention::FlashAttention`` node over a paged pool (block_size 16, shuffled blocks).
  Each pool is bound as both input and output through IO binding, so the kernel updates it in place,
  as the runtime does.
- **ORT**: one ``Attention`` node with ``past_key/past_value`` [B, 3, P, 64] (dense, contiguous). It must
  write ``present_key/value`` [B, 3, P+S, 64], a copy of the whole cache, on every call.

Every input and output of both is a pre-allocated OrtValue bound once, so a timed call is
``run_with_iobinding`` alone. Each figure is the median of repeated calls. Both ops see the same
numbers, and the table prints max|ours - ORT| as a check that they do the same work. Results go to
benchmarks/results/attention_cpu.json with the machine, date, versions and command.
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


def flash_attention_model() -> onnx.ModelProto:
    names = ["q", "k", "v", "k_cache", "v_cache", "block_table", "slot_mapping", "past_lens", "total_lens"]
    node = helper.make_node(
        "FlashAttention",
        names,
        ["o", "k_cache_out", "v_cache_out"],
        domain="fastattention",
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        scale=SCALE,
        causal=1,
        sliding_window=0,
        kv_format="fp32",
    )
    types = dict(block_table=TensorProto.INT32, slot_mapping=TensorProto.INT64)
    types.update(past_lens=TensorProto.INT32, total_lens=TensorProto.INT32)
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in names]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    graph = helper.make_graph([node], "flash_attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("fastattention", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def ort_attention_model() -> onnx.ModelProto:
    node = helper.make_node(
        "Attention",
        ["q", "k", "v", "", "past_key", "past_value"],
        ["o", "present_key", "present_value"],
        q_num_heads=NUM_HEADS,
        kv_num_heads=NUM_KV_HEADS,
        is_causal=1,
        scale=SCALE,
    )
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.input if n]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    graph = helper.make_graph([node], "attention23", inputs, outputs)
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


def session(model: onnx.ModelProto, threads: int, with_kernel: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if with_kernel and not attention_cpu.register(options):
        raise SystemExit("the kernel library is not built: run `python -m kernels.attention_cpu build` first")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def figure(shape: Shape, ms: float) -> str:
    """Decode: GB/s of K and V streamed. Prefill: GFLOP/s of the causal QK^T and PV."""
    if shape.new_tokens == 1:
        kv_bytes = 2 * shape.batch * (shape.past + 1) * NUM_KV_HEADS * HEAD_DIM * 4
        return f"{kv_bytes / ms / 1e6:.1f} GB/s"
    pairs = shape.new_tokens * (shape.new_tokens + 1) / 2
    return f"{4 * pairs * NUM_HEADS * HEAD_DIM * shape.batch / ms / 1e6:.1f} GFLOP/s"


def measure(shape: Shape, threads: int, seconds: float, seed: int = 0) -> dict:
    ours_feeds, ort_feeds = make_inputs(shape, np.random.default_rng(seed))
    B, S, P = shape.batch, shape.new_tokens, shape.past
    o_ours = np.empty((B, S, NUM_HEADS * HEAD_DIM), np.float32)
    o_ort = np.empty_like(o_ours)
    present = [np.empty((B, NUM_KV_HEADS, P + S, HEAD_DIM), np.float32) for _ in range(2)]
    ours = session(flash_attention_model(), threads, with_kernel=True)
    ours_binding = bind(ours, ours_feeds, dict(o=o_ours, k_cache_out="k_cache", v_cache_out="v_cache"))
    theirs = session(ort_attention_model(), threads, with_kernel=False)
    ort_binding = bind(theirs, ort_feeds, dict(o=o_ort, present_key=present[0], present_value=present[1]))
    ours_ms, ours_calls = median_ms(ours, ours_binding, seconds)
    ort_ms, ort_calls = median_ms(theirs, ort_binding, seconds)
    ours_out = ours_binding.get_outputs()[0].numpy()
    ort_out = ort_binding.get_outputs()[0].numpy()
    return dict(
        shape=shape.name,
        **asdict(shape),
        threads=threads,
        ours_ms=round(ours_ms, 4),
        ort_attention23_ms=round(ort_ms, 4),
        speedup=round(ort_ms / ours_ms, 2),
        ours_figure=figure(shape, ours_ms),
        calls=dict(ours=ours_calls, ort=ort_calls),
        max_abs_diff=float(np.abs(ours_out - ort_out).max()),
    )


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


ROW = "{:<30} {:>3} {:>9} {:>10} {:>8} {:>16} {:>9}"


def print_row(r: dict) -> None:
    ours, theirs, speedup = f"{r['ours_ms']:.3f}", f"{r['ort_attention23_ms']:.3f}", f"{r['speedup']:.2f}x"
    print(
        ROW.format(
            r["shape"], r["threads"], ours, theirs, speedup, r["ours_figure"], f"{r['max_abs_diff']:.1e}"
        )
    )


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
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra_op_num_threads values")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per op, shape, thread count")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    info = machine()
    print(f"device: {info['cpu']} ({info['cores']} cores)")
    print(f"float32, num_heads={NUM_HEADS}, num_kv_heads={NUM_KV_HEADS}, head_dim={HEAD_DIM}, causal")
    print(ROW.format("shape", "thr", "ours ms", "ORT-23 ms", "speedup", "ours", "max|diff|"))
    results = []
    for shape in SHAPES:
        for threads in args.threads:
            results.append(measure(shape, threads, args.seconds))
            print_row(results[-1])
    report = dict(
        benchmark="FlashAttention CPU kernel vs ai.onnx Attention-23",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python -m benchmarks.attention_cpu", *(sys.argv[1:] if argv is None else argv)]),
        machine=info,
        versions=versions(),
        config=dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE),
        note="Median per call. The machine was shared with other work during the run, so treat the figures "
        "as indicative. Ours updates its pools in place (IO binding). ORT writes present_key/value.",
        results=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
