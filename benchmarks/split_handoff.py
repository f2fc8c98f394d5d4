"""Prefill on one host, decode on another: TTFT and tokens/s, co-located vs split, and the split policy.

Two hosts are two Linux network namespaces joined by a veth pair on this machine (traffic never leaves
it); `tc tbf` shapes the link in both directions. The prefill host runs the prefill service with 2
threads (the stronger box); the decode host runs tokenizer, decode (1 thread: the weak box) and two
gateways: one that never splits (decode prefills the prompt itself: co-located) and one that always
splits (prefill on the other host, the KV cache pulled over the link). For each artifact (fp16 and
int8 KV on the wire), link rate and prompt length the probe measures both, then asks the gateway's
cost model (services/gateway/split_policy.py) with the measured figures whether it would split, and
compares that with the measured winner.

    sudo .venv/bin/python benchmarks/split_handoff.py \\
        --artifact fp16=artifacts/smollm2-135m-instruct-fast --artifact int8=artifacts/smollm2-kv-int8 \\
        --out benchmarks/results/split_handoff.json

Needs root (netns, veth, tc). The policy's inputs are measured, never set by hand: link bandwidth (a
TCP stream between the namespaces) and RTT (TCP ping-pong), the decode node's prefill rate (co-located
TTFT of a calibration prompt), the prefill node's (a direct Prefill call), and the fixed cost of a
split (calibrated once, on the first link, at the calibration length, which is not an evaluated one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NS_PREFILL, NS_DECODE = "edge-pf", "edge-dc"
IP_PREFILL, IP_DECODE = "10.77.0.1", "10.77.0.2"
GATEWAY_LOCAL, GATEWAY_SPLIT = "127.0.0.1:50060", "127.0.0.1:50070"
PREFILL = f"{IP_PREFILL}:50062"
CAL_TOKENS = 384
MODEL = "bench"


# ---- the two hosts and the link ----------------------------------------------------------------------


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def make_hosts() -> None:
    remove_hosts()
    for ns in (NS_PREFILL, NS_DECODE):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh(
        "ip",
        "link",
        "add",
        "edge-vpf",
        "netns",
        NS_PREFILL,
        "type",
        "veth",
        "peer",
        "edge-vdc",
        "netns",
        NS_DECODE,
    )
    for ns, dev, ip in ((NS_PREFILL, "edge-vpf", IP_PREFILL), (NS_DECODE, "edge-vdc", IP_DECODE)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def remove_hosts() -> None:
    for ns in (NS_PREFILL, NS_DECODE):
        sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth with it


def shape_link(rate_mbit: int, delay_ms: float) -> dict:
    """tbf at `rate_mbit` on both ends; netem for the delay where the kernel has it."""
    burst = max(32_000, rate_mbit * 1_000_000 // 8 // 250)
    notes = {}
    for ns, dev in ((NS_PREFILL, "edge-vpf"), (NS_DECODE, "edge-vdc")):
        tc = ("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev)
        netem = sh(*tc, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms", check=False)
        parent = ("parent", "1:1") if netem.returncode == 0 else ("root",)
        notes["netem"] = netem.returncode == 0 or netem.stderr.strip()
        sh(*tc, *parent, "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "20ms")
    return notes


def in_ns(ns: str, *command: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *command], cwd=ROOT, **kw)


def measure_link(seconds_at_rate: float, rate_mbit: int) -> dict:
    """Bandwidth: one TCP stream prefill -> decode (the KV's direction); RTT: 200 one-byte ping-pongs."""
    nbytes = int(rate_mbit * 1e6 / 8 * seconds_at_rate)
    sink = in_ns(NS_DECODE, PY, __file__, "_sink", stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    source = in_ns(NS_PREFILL, PY, __file__, "_source", str(nbytes), stdout=subprocess.PIPE, text=True)
    rtt_ms = json.loads(source.communicate(timeout=120)[0])["rtt_ms"]
    bandwidth_mbps = json.loads(sink.communicate(timeout=120)[0])["mbps"]
    return {"bandwidth_mbps": round(bandwidth_mbps, 1), "rtt_ms": round(rtt_ms, 3)}


def _sink() -> None:
    with socket.create_server((IP_DECODE, 5201)) as server:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(200):  # ping-pong
                conn.sendall(conn.recv(1))
            total, start = 0, None
            while chunk := conn.recv(1 << 20):
                start = start or time.perf_counter()
                total += len(chunk)
            elapsed = time.perf_counter() - start
    print(json.dumps({"mbps": total * 8 / elapsed / 1e6}))


def _source(nbytes: int) -> None:
    with socket.create_connection((IP_DECODE, 5201)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(200):
            t = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            rtts.append((time.perf_counter() - t) * 1e3)
        block = b"\0" * (1 << 20)
        for start in range(0, nbytes, len(block)):
            conn.sendall(block[: nbytes - start])
    print(json.dumps({"rtt_ms": statistics.median(rtts)}))


# ---- the services -------------------------------------------------------------------------------------


def node_yaml(artifact: Path, threads: int, split: str) -> str:
    return json.dumps(  # JSON is YAML
        {
            "artifact": str(artifact.resolve()),
            "model": MODEL,
            "log_level": "WARNING",
            "runtime": {"num_threads": threads, "max_batch_size": 4},
            "tokenizer": {"address": "127.0.0.1:50061"},
            "prefill": {"address": f"0.0.0.0:{PREFILL.split(':')[1]}", "kv_lease_seconds": 30},
            "decode": {"address": "0.0.0.0:50063"},
            "gateway": {
                "address": GATEWAY_LOCAL,
                "tokenizer": "127.0.0.1:50061",
                "decode": [f"{IP_DECODE}:50063"],
                "prefill": [PREFILL],
                "split_policy": split,
            },
        }
    )


def start_services(artifact: Path, workdir: Path) -> list[subprocess.Popen]:
    configs = {}
    for name, threads, split in (("prefill", 2, "always"), ("decode", 1, "never"), ("split", 1, "always")):
        configs[name] = workdir / f"{name}.yaml"
        configs[name].write_text(node_yaml(artifact, threads, split))
    log = open(workdir / "services.log", "a")  # noqa: SIM115 - closed with the processes' lifetime
    plan = [
        (NS_PREFILL, "prefill", configs["prefill"], []),
        (NS_DECODE, "tokenizer", configs["decode"], []),
        (NS_DECODE, "decode", configs["decode"], []),
        (NS_DECODE, "gateway", configs["decode"], ["--address", GATEWAY_LOCAL]),
        (NS_DECODE, "gateway", configs["split"], ["--address", GATEWAY_SPLIT]),
    ]
    procs = [
        in_ns(ns, PY, "-m", f"services.{svc}", "--config", str(cfg), *extra, stdout=log, stderr=log)
        for ns, svc, cfg, extra in plan
    ]
    for ns, address in ((NS_PREFILL, PREFILL), (NS_DECODE, f"{IP_DECODE}:50063"), (NS_DECODE, GATEWAY_LOCAL)):
        wait = in_ns(ns, PY, "-m", "services.cli", "health", address, "--timeout", "300")
        if wait.wait() != 0:
            stop_services(procs)
            raise RuntimeError(f"{address} did not become healthy; see {workdir / 'services.log'}")
    in_ns(NS_DECODE, PY, "-m", "services.cli", "health", GATEWAY_SPLIT, "--timeout", "60").wait()
    return procs


def stop_services(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


# ---- the probe: runs on the decode host ---------------------------------------------------------------


def _probe(spec: str) -> None:
    """Median TTFT and decode tokens/s of each (gateway, length); the remote prefill time at CAL_TOKENS."""
    import grpc
    import numpy as np

    from protos.edge.v1 import prefill_pb2, prefill_pb2_grpc
    from services.client import EdgeClient, sampling

    args = json.loads(spec)
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(100, 40_000, n).tolist() for n in [CAL_TOKENS, *args["lengths"]]}

    def one(address: str, ids: list[int]) -> tuple[float, float]:
        with EdgeClient(address, timeout=300) as client:
            start = time.perf_counter()
            stamps = []
            for chunk in client.generate(ids, max_tokens=args["max_tokens"], ignore_eos=True):
                stamps += [time.perf_counter()] * len(chunk.token_ids)
        ttft_ms = (stamps[0] - start) * 1e3
        return ttft_ms, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def median_of(address: str, n: int) -> dict:
        one(address, prompts[n][: max(1, n // 8)])  # warm the path (channels, sessions) untimed
        runs = [one(address, prompts[n]) for _ in range(args["repeats"])]
        return {
            "ttft_ms": round(statistics.median(r[0] for r in runs), 1),
            "ttft_ms_runs": [round(r[0], 1) for r in runs],
            "decode_tokens_per_s": round(statistics.median(r[1] for r in runs), 1),
        }

    def remote_prefill_ms(n: int) -> float:
        with grpc.insecure_channel(PREFILL) as channel:
            stub = prefill_pb2_grpc.PrefillStub(channel)
            times = []
            for _ in range(args["repeats"]):
                request = prefill_pb2.PrefillRequest(
                    model=MODEL, prompt_token_ids=prompts[n], sampling=sampling(max_tokens=2)
                )
                start = time.perf_counter()
                reply = stub.Prefill(request, timeout=300)
                times.append((time.perf_counter() - start) * 1e3)
                stub.Release(prefill_pb2.ReleaseRequest(session_id=reply.kv.session_id))
        return statistics.median(times)

    out = {"rows": []}
    if args["calibrate"]:
        out["local_cal"] = median_of(GATEWAY_LOCAL, CAL_TOKENS)
        out["split_cal"] = median_of(GATEWAY_SPLIT, CAL_TOKENS)
        out["remote_prefill_ms"] = remote_prefill_ms(CAL_TOKENS)
    for n in args["lengths"]:
        out["rows"].append(
            {"prompt_tokens": n, "local": median_of(GATEWAY_LOCAL, n), "split": median_of(GATEWAY_SPLIT, n)}
        )
    print(json.dumps(out))


def probe(lengths: list[int], repeats: int, max_tokens: int, calibrate: bool) -> dict:
    spec = json.dumps(
        {"lengths": lengths, "repeats": repeats, "max_tokens": max_tokens, "calibrate": calibrate}
    )
    p = in_ns(NS_DECODE, PY, __file__, "_probe", spec, stdout=subprocess.PIPE, text=True)
    stdout, _ = p.communicate(timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"probe exited {p.returncode}")
    return json.loads(stdout)


# ---- the run ------------------------------------------------------------------------------------------


def run_artifact(name: str, artifact: Path, links: list[int], args, workdir: Path) -> dict:
    from runtime.artifact import load_artifact
    from services.gateway.split_policy import SplitPolicy

    loaded = load_artifact(artifact, verify=False)
    kv_bytes, handoff_bytes = loaded.kv_bytes_per_token, loaded.kv_handoff_bytes  # SAQ: not linear
    result = {"kv": name, "artifact": str(artifact), "kv_bytes_per_token": kv_bytes, "links": []}
    procs = start_services(artifact, workdir)
    try:
        calibration = None
        for rate in links:
            notes = shape_link(rate, args.delay_ms)
            link = measure_link(2.0, rate)
            measured = probe(args.lengths, args.repeats, args.max_tokens, calibrate=calibration is None)
            if calibration is None:
                calibration = calibrate(measured, link, handoff_bytes(CAL_TOKENS))
            policy = SplitPolicy(
                mode="auto",
                link_bandwidth_mbps=link["bandwidth_mbps"],
                link_rtt_ms=link["rtt_ms"],
                local_prefill_tokens_per_s=calibration["local_prefill_tokens_per_s"],
                remote_prefill_tokens_per_s=calibration["remote_prefill_tokens_per_s"],
                kv_handoff_bytes=handoff_bytes,
                split_overhead_ms=calibration["split_overhead_ms"],
            )
            for row in measured["rows"]:
                n = row["prompt_tokens"]
                estimate = policy.estimate(n)
                faster = "split" if row["split"]["ttft_ms"] < row["local"]["ttft_ms"] else "local"
                row["policy"] = "split" if policy.should_split(n) else "local"
                row["measured_faster"] = faster
                row["policy_right"] = row["policy"] == faster
                row["gap_pct"] = round(
                    100 * abs(row["split"]["ttft_ms"] - row["local"]["ttft_ms"]) / row["local"]["ttft_ms"], 1
                )
                row["model_ms"] = {"local": round(estimate.local_ms, 1), "split": round(estimate.split_ms, 1)}
            result["links"].append(
                {
                    "shaped_mbit": rate,
                    "requested_delay_ms": args.delay_ms,
                    "netem": notes["netem"],
                    "measured": link,
                    "break_even_tokens": policy.break_even_tokens(),
                    "rows": measured["rows"],
                }
            )
            print(json.dumps(result["links"][-1]), file=sys.stderr)
        result["calibration"] = calibration
    finally:
        stop_services(procs)
    return result


def calibrate(measured: dict, link: dict, handoff_bytes: int) -> dict:
    """Prefill rates of both nodes and the split's fixed cost, at CAL_TOKENS on the first link
    (`handoff_bytes`: what the handoff of a CAL_TOKENS prompt moves)."""
    local_ms = measured["local_cal"]["ttft_ms"]
    remote_ms = measured["remote_prefill_ms"]
    transfer_ms = handoff_bytes * 8 / (link["bandwidth_mbps"] * 1e6) * 1e3
    overhead = measured["split_cal"]["ttft_ms"] - remote_ms - transfer_ms - 2 * link["rtt_ms"]
    return {
        "prompt_tokens": CAL_TOKENS,
        "local_ttft_ms": local_ms,
        "split_ttft_ms": measured["split_cal"]["ttft_ms"],
        "remote_prefill_ms": round(remote_ms, 1),
        "local_prefill_tokens_per_s": round(CAL_TOKENS / local_ms * 1e3, 1),
        "remote_prefill_tokens_per_s": round(CAL_TOKENS / remote_ms * 1e3, 1),
        "split_overhead_ms": round(max(overhead, 0.0), 1),
    }


def machine() -> dict:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "loadavg_at_start": load}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # the helpers that run inside a namespace
        {"_sink": _sink, "_source": lambda: _source(int(sys.argv[2])), "_probe": lambda: _probe(sys.argv[2])}[
            sys.argv[1]
        ]()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--artifact", action="append", required=True, help="NAME=PATH (KV format on the wire)"
    )
    parser.add_argument("--links", default="1000,100", help="link rates in Mbit/s")
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--lengths", default="32,128,512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    results = {
        "benchmark": "split_handoff",
        "command": " ".join(["benchmarks/split_handoff.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "setup": {
            "prefill_host": f"netns {NS_PREFILL}, prefill service, 2 threads",
            "decode_host": f"netns {NS_DECODE}, tokenizer + decode (1 thread) + gateways",
            "link": "veth pair, tc tbf on both ends",
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
        },
        "artifacts": [],
    }
    make_hosts()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in args.artifact:
                name, path = spec.split("=", 1)
                links = [int(r) for r in args.links.split(",")]
                results["artifacts"].append(run_artifact(name, Path(path), links, args, Path(tmp)))
    finally:
        remove_hosts()
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
