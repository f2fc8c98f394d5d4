"""KV formats on the GPU: decode speed of the torch backend per format, with and without CUDA graphs.

    python -m benchmarks.kv_formats_gpu --artifacts fp16=DIR int8=DIR int4=DIR saq=DIR [--context 1920]

Every artifact is the same model exported with a different `--kv-dtype`; each runs in an in-process Engine
on the torch backend (compute_dtype fp16, attention_kernel auto: the Triton kernels of its format), once
with decode steps replayed from CUDA graphs and once eagerly (SAQ: the stages a replayed step completes
close after it, batched over layers and rows). Per batch size B: B prompts of random token ids (numpy
seed 0, the same for every format), row b's `--stagger` * b tokens shorter than `--context` (so the rows
of an SAQ cache complete their stages on different steps, as in serving), `--new-tokens` greedy tokens
each (EOS ignored); decode tok/s = B * (new - 1) / (every row has its first token -> the last token),
median of `--repeats` after one warm-up generation (compiles the kernels, captures the graphs). The
first artifact is the baseline of the `vs_first` ratios, measured in the same process.
Results: benchmarks/results/kv_formats_gpu.json with the card, versions, date and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.kv_accuracy import kv_bytes_at
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.sampling import SamplingParams


def decode_tok_s(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    requests = {engine.add_request(ids, params) for ids in prompts}
    started, last, counts = None, None, dict.fromkeys(requests, 0)
    while engine.has_work():
        events = engine.step()
        for event in events:
            counts[event.request_id] += 1
        if events:
            last = time.perf_counter()
        if started is None and all(counts.values()):
            started = last
    assert all(n == new_tokens for n in counts.values()), counts
    return len(prompts) * (new_tokens - 1) / (last - started)


def measure(path: str, graphs: bool, batch: int, args) -> dict:
    config = RuntimeConfig(
        backend="torch", device="cuda", compute_dtype="fp16", cuda_graphs=graphs, max_batch_size=batch,
        max_seq_len=args.context + args.new_tokens, kv_cache_bytes=args.kv_cache_mib << 20,
    )  # fmt: skip
    engine = Engine.from_artifact(path, config, verify=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, engine.artifact.model.vocab_size, (batch, args.context)).tolist()
    prompts = [row[: args.context - args.stagger * b] for b, row in enumerate(ids)]
    decode_tok_s(engine, prompts, args.new_tokens)  # warm-up
    samples = [decode_tok_s(engine, prompts, args.new_tokens) for _ in range(args.repeats)]
    used = getattr(engine.backend, "_graphs", None)
    row = dict(decode_tok_s=statistics.median(samples), samples=samples)
    row["graphs_replayed"] = sorted(used.graphs) if graphs and used is not None else []
    row["kv_bytes_per_row_at_context"] = kv_bytes_at(engine, args.context)
    del engine
    torch.cuda.empty_cache()
    return row


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(gpu=props.name, sms=props.multi_processor_count, python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                platform=platform.platform())  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifacts", nargs="+", required=True, help="name=DIR; the first is the baseline")
    parser.add_argument("--context", type=int, default=1920)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--stagger", type=int, default=16, help="row b's prompt: b x N tokens shorter")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="graphs,eager", help="graphs and/or eager decode steps")
    parser.add_argument("--kv-cache-mib", type=int, default=4096)
    parser.add_argument("--output", default="benchmarks/results/kv_formats_gpu.json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"graphs", "eager"}:
        parser.error(f"--modes {args.modes!r}: a comma-separated list of graphs and eager")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results = {}
    for name, path in (item.split("=", 1) for item in args.artifacts):
        entry = results.setdefault(name, {"artifact": path})
        for batch in (int(b) for b in args.batches.split(",")):
            for graphs in [mode == "graphs" for mode in modes]:
                row = measure(path, graphs, batch, args)
                entry[f"B{batch}_{'graphs' if graphs else 'eager'}"] = row
                print(
                    f"{name:>6} B={batch:<2} graphs={graphs!s:<5} {row['decode_tok_s']:8.1f} tok/s",
                    flush=True,
                )
            if f"B{batch}_graphs" in entry and f"B{batch}_eager" in entry:
                entry[f"B{batch}_graph_speedup"] = (
                    entry[f"B{batch}_graphs"]["decode_tok_s"] / entry[f"B{batch}_eager"]["decode_tok_s"]
                )
    base = next(iter(results.values()))
    for entry in results.values():
        entry["vs_first"] = {
            key: entry[key]["decode_tok_s"] / base[key]["decode_tok_s"]
            for key in entry
            if key.endswith(("_graphs", "_eager"))
        }
    out = dict(
        benchmark="kv_formats_gpu",
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join(["python -m benchmarks.kv_formats_gpu"] + (argv or sys.argv[1:])),
        settings=vars(args),
        environment=environment(),
        results=results,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
