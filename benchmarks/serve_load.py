"""Load benchmark of the gRPC stack on loopback against the in-process engine, one run, one machine.

    python -m benchmarks.serve_load [--artifact DIR] [--concurrency 1,4,16] [--prompt-tokens 128]
                                    [--new-tokens 128] [--rounds 2] [--threads 2]

1. in process: the engine alone (same artifact and runtime settings as the decode service), one
   stream and N streams batched, timed in this process before any service starts;
2. through the gateway: tokenizer, decode and gateway started as `edge up` starts them (prefill is not
   on the co-located path), then for each concurrency N, N asyncio clients each send `--rounds`
   requests back to back. Per request: time to first token (TTFT) and inter-token latencies (ITL);
   per run: aggregate generated tokens/s; KV bytes per sequence from the decode service's stats.
Every prompt is different (a window of stdlib docstrings, cut to exactly --prompt-tokens tokens).
Results go to benchmarks/results/serve_load.json with the machine, date, command and load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.sampling import SamplingParams
from services import launcher

ROOT = Path(__file__).resolve().parents[1]


def prompts(engine: Engine, count: int, length: int) -> list[list[int]]:
    import pydoc

    text = " ".join(
        filter(None, (pydoc.getdoc(m) for m in (os, json, asyncio, statistics, argparse, platform)))
    )
    ids = engine.tokenizer.encode(text)
    stride = max(1, (len(ids) - length) // max(1, count))
    return [ids[i * stride : i * stride + length] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(records: list[dict], wall_s: float) -> dict:
    ttft = [r["ttft_ms"] for r in records]
    itl = [x for r in records for x in r["itl_ms"]]
    tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "aggregate_tokens_per_s": round(tokens / wall_s, 2),
        "ttft_ms_p50": round(percentile(ttft, 50), 2),
        "ttft_ms_p99": round(percentile(ttft, 99), 2),
        "itl_ms_p50": round(percentile(itl, 50), 2),
        "itl_ms_p99": round(percentile(itl, 99), 2),
    }


def in_process(engine: Engine, batch: list[list[int]], new_tokens: int) -> dict:
    """All prompts added at once; the engine batches them. Times per request as the gateway's."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = {engine.add_request(p, params): p for p in batch}
    last = dict.fromkeys(ids, start)
    records = {r: {"ttft_ms": None, "itl_ms": [], "tokens": 0} for r in ids}
    while engine.has_work():
        for event in engine.step():
            now, rec = time.perf_counter(), records[event.request_id]
            if rec["ttft_ms"] is None:
                rec["ttft_ms"] = (now - start) * 1e3
            else:
                rec["itl_ms"].append((now - last[event.request_id]) * 1e3)
            last[event.request_id] = now
            rec["tokens"] += 1
    return summarize(list(records.values()), time.perf_counter() - start)


async def one_request(client, prompt: list[int], new_tokens: int) -> dict:
    start = time.perf_counter()
    last, record = start, {"ttft_ms": None, "itl_ms": [], "tokens": 0}
    async for chunk in client.generate(prompt, max_tokens=new_tokens, ignore_eos=True):
        now = time.perf_counter()
        if record["ttft_ms"] is None:
            record["ttft_ms"] = (now - start) * 1e3
        else:
            record["itl_ms"].append((now - last) * 1e3)
        last = now
        record["tokens"] += len(chunk.token_ids)
    return record


async def through_gateway(address: str, batch: list[list[int]], new_tokens: int, rounds: int) -> dict:
    from services.client import AsyncEdgeClient

    async with AsyncEdgeClient(address, timeout=600) as client:
        await client.complete(batch[0][:8], max_tokens=2)  # warm the channel

        async def worker(prompt):
            return [await one_request(client, prompt, new_tokens) for _ in range(rounds)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(p) for p in batch))
        wall = time.perf_counter() - start
    return summarize([r for rs in results for r in rs], wall)


def start_stack(artifact: Path, runtime: dict, folder: Path) -> tuple[list, str]:
    at = {n: f"127.0.0.1:{launcher.free_port()}" for n in ("tokenizer", "decode", "gateway")}
    node = {
        "artifact": str(artifact),
        "log_level": "WARNING",
        "runtime": runtime,
        "tokenizer": {"address": at["tokenizer"]},
        "decode": {"address": at["decode"]},
        "gateway": {"address": at["gateway"], "tokenizer": at["tokenizer"], "decode": [at["decode"]]},
    }
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump(node))
    processes = []
    for name in ("tokenizer", "decode", "gateway"):
        processes.append(launcher.start(name, config, at[name], folder))
        launcher.wait_serving(at[name], 120, processes[-1])
    return processes, at


def run(args) -> dict:
    runtime = {
        "num_threads": args.threads,
        "max_batch_size": max(args.concurrency),
        "kv_cache_bytes": 512 * 2**20,
    }
    engine = Engine.from_artifact(args.artifact, RuntimeConfig(**runtime))
    batch_all = prompts(engine, max(args.concurrency), args.prompt_tokens)
    engine_results = {}
    in_process(engine, batch_all[:1], 8)  # warm-up
    for n in args.concurrency:
        engine_results[str(n)] = in_process(engine, batch_all[:n], args.new_tokens)
    per_token = engine.artifact.kv_bytes_per_token
    kv = {
        "bytes_per_token": per_token,
        "reserved_bytes_per_sequence": engine.allocator.bytes_for(args.prompt_tokens + args.new_tokens),
        "kv_format": engine.artifact.kv_format,
    }
    del engine
    gateway_results = {}
    with tempfile.TemporaryDirectory() as tmp:
        processes, at = start_stack(Path(args.artifact).resolve(), runtime, Path(tmp))
        try:
            for n in args.concurrency:
                gateway_results[str(n)] = asyncio.run(
                    through_gateway(at["gateway"], batch_all[:n], args.new_tokens, args.rounds)
                )
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
    return {"in_process": engine_results, "gateway": gateway_results, "kv_per_sequence": kv}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "smollm2-135m-instruct"))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",")]
    load_before = os.getloadavg()
    results = run(args)
    single_in, single_gw = results["in_process"]["1"], results["gateway"]["1"]
    top = str(max(args.concurrency))
    results["checks"] = {
        "gateway_single_stream_vs_in_process": round(
            single_gw["aggregate_tokens_per_s"] / single_in["aggregate_tokens_per_s"], 3
        ),
        f"gateway_{top}_streams_vs_single": round(
            results["gateway"][top]["aggregate_tokens_per_s"] / single_gw["aggregate_tokens_per_s"], 3
        ),
        f"gateway_{top}_ttft_p99_over_p50": round(
            results["gateway"][top]["ttft_ms_p99"] / results["gateway"][top]["ttft_ms_p50"], 3
        ),
    }
    results.update(
        benchmark="serve_load",
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        machine={"platform": platform.platform(), "cpu": _cpu(), "cores": os.cpu_count()},
        settings={k: v for k, v in vars(args).items() if k != "output"},
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("in_process", "gateway", "checks")}, indent=1))
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
