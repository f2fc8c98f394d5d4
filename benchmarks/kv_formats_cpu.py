"""KV formats on the CPU: bytes per token, decode speed at a long context, and the prefill -> decode handoff.

    python -m benchmarks.kv_formats_cpu --artifacts fp32=DIR fp16=DIR int8=DIR int4=DIR [--context 4096]

For every artifact (the same model exported with a different `--kv-dtype`):
- kv bytes/token: from the manifest (K and V over all layers, scales included); bytes of one sequence at
  `--context` tokens, allocated by the runtime and held by the format (they differ for SAQ: see
  benchmarks/kv_accuracy.kv_bytes_at);
- decode tok/s at `--context`: in-process engine, a prompt of exactly `--context` tokens of standard-library
  docstrings, `--new-tokens` greedy tokens, (new - 1) / (first token -> last token); median of `--repeats`;
- handoff over loopback: a real prefill service process (`python -m services.prefill`) prefills the prompt
  and keeps its KV; this process then pulls it with PullKv exactly as a decode node does (chunks of the
  artifact's pool tensors, in its format); bytes on the wire (payload) and the pull's wall time, median
  of `--repeats`.
Results: benchmarks/results/kv_formats_cpu.json with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from benchmarks.kv_accuracy import kv_bytes_at
from exporters.calibration import stdlib_text
from protos.edge.v1 import prefill_pb2, prefill_pb2_grpc
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.sampling import SamplingParams
from services import launcher

TEXT_MODULES = ("collections", "functools", "itertools", "pathlib", "string", "textwrap", "types", "weakref")


def prompt_ids(engine: Engine, tokens: int) -> list[int]:
    ids = engine.tokenizer.encode(stdlib_text(TEXT_MODULES * 4), add_special_tokens=False)
    if len(ids) < tokens:
        raise ValueError(f"only {len(ids)} prompt tokens available, {tokens} asked for")
    return ids[:tokens]


def decode_speed(engine: Engine, ids: list[int], new_tokens: int, repeats: int) -> list[float]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    speeds = []
    for _ in range(repeats):
        times = [time.perf_counter() for _ in engine.generate(ids, params)]
        speeds.append((len(times) - 1) / (times[-1] - times[0]))
    return speeds


def handoff(artifact: str, ids: list[int], threads: int, repeats: int, run_dir: Path) -> dict:
    address = f"127.0.0.1:{launcher.free_port()}"
    node = {
        "artifact": artifact,
        "log_level": "WARNING",
        "runtime": {"num_threads": threads, "kv_cache_bytes": 512 << 20},
        "prefill": {"address": address, "kv_lease_seconds": 60},
    }
    config = run_dir / f"{Path(artifact).name}.yaml"
    config.write_text(yaml.safe_dump(node))
    process = launcher.start("prefill", config, None, run_dir)
    try:
        launcher.wait_serving(address, 300, process)
        samples, payload, messages = [], 0, 0
        with grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)
            for i in range(repeats):
                request = prefill_pb2.PrefillRequest(request_id=f"h{i}", prompt_token_ids=ids)
                request.sampling.max_tokens = 2
                reply = stub.Prefill(request)
                start = time.perf_counter()
                payload = messages = 0
                for chunk in stub.PullKv(prefill_pb2.PullKvRequest(session_id=reply.kv.session_id)):
                    payload += len(chunk.data)
                    messages += 1
                samples.append(time.perf_counter() - start)
                stub.Release(prefill_pb2.ReleaseRequest(session_id=reply.kv.session_id))
        return {"payload_bytes": payload, "messages": messages, "pull_seconds": samples,
                "pull_seconds_median": statistics.median(samples),
                "payload_mb_per_s": payload / statistics.median(samples) / 1e6}  # fmt: skip
    finally:
        launcher.stop_pid(process.pid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifacts", nargs="+", required=True, help="name=DIR")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default="benchmarks/results/kv_formats_cpu.json")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (item.split("=", 1) for item in args.artifacts):
            engine = Engine.from_artifact(
                path, RuntimeConfig(num_threads=args.threads, kv_cache_bytes=512 << 20)
            )
            ids = prompt_ids(engine, args.context)
            speeds = decode_speed(engine, ids, args.new_tokens, args.repeats)
            entry = {
                "kv_format": engine.artifact.kv_spec,
                "kv_bytes_per_token": engine.artifact.kv_bytes_per_token,
                "kv_bytes_at_context": kv_bytes_at(engine, args.context),  # allocated / held
                "decode_tok_s": speeds,
                "decode_tok_s_median": statistics.median(speeds),
            }
            del engine
            entry["handoff"] = handoff(path, ids, args.threads, args.repeats, Path(tmp))
            results[name] = entry
            print(name, json.dumps({k: v for k, v in entry.items() if k != "decode_tok_s"}), flush=True)
    base = next(iter(results.values()))
    for entry in results.values():
        entry["decode_vs_first"] = entry["decode_tok_s_median"] / base["decode_tok_s_median"]
        entry["bytes_vs_first"] = entry["kv_bytes_at_context"]["held"] / base["kv_bytes_at_context"]["held"]
    out = {
        "benchmark": "kv_formats_cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m benchmarks.kv_formats_cpu"] + (argv or sys.argv[1:])),
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
