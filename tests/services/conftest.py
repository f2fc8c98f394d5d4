"""A running stack for the service tests: every service its own process, started with the same
command `edge up` uses (services/launcher.py), on free loopback ports, over the embedded model."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml

from protos.edge.v1 import decode_pb2, decode_pb2_grpc
from services import launcher
from services.launcher import free_port


class Stack:
    """Processes by name; each can be killed and started again on its address."""

    def __init__(self, config: Path, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.addresses: dict[str, str] = {}
        self.processes = {}

    def start(self, name: str, service: str, address: str, config: Path | None = None) -> None:
        self.addresses[name] = address
        process = launcher.start(service, config or self.config, address, self.run_dir / name)
        self.processes[name] = process
        launcher.wait_serving(address, 120, process)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.kill()
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except Exception:
                process.kill()

    def decode_stats(self, name: str = "decode") -> decode_pb2.DecodeStats:
        with grpc.insecure_channel(self.addresses[name]) as channel:
            return decode_pb2_grpc.DecodeStub(channel).Stats(decode_pb2.StatsRequest(), timeout=10)


def write_config(path: Path, artifact: Path, ports: dict[str, int], gateway: dict) -> Path:
    at = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    node = {
        "artifact": str(artifact),
        "model": "smollm2",
        "log_level": "INFO",
        "runtime": {"num_threads": 1, "max_batch_size": 8, "kv_cache_bytes": 64 * 2**20},
        "tokenizer": {"address": at["tokenizer"]},
        "prefill": {"address": at["prefill"], "kv_lease_seconds": 20},
        "decode": {"address": at["decode"], "drain_seconds": 20},
        "gateway": {"address": at["gateway"], "tokenizer": at["tokenizer"], **gateway},
    }
    path.write_text(yaml.safe_dump(node))
    return path


@pytest.fixture(scope="session")
def stack(tmp_path_factory, smollm2_default):
    """tokenizer, prefill, two decode replicas and three gateways:
    `gateway` (decode), `gateway_disagg` (prefill -> decode), `gateway_replicas` (decode2, decode3)."""
    folder = tmp_path_factory.mktemp("stack")
    ports = {n: free_port() for n in ("tokenizer", "prefill", "decode", "decode2", "decode3", "gateway")}
    ports.update(gateway_disagg=free_port(), gateway_replicas=free_port())
    at = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    config = write_config(folder / "node.yaml", smollm2_default, ports, {"decode": [at["decode"]]})
    disagg = write_config(
        folder / "disagg.yaml", smollm2_default, ports, {"decode": [at["decode"]], "prefill": [at["prefill"]]}
    )
    replicas = write_config(
        folder / "replicas.yaml", smollm2_default, ports, {"decode": [at["decode2"], at["decode3"]]}
    )
    running = Stack(config, folder)
    try:
        for name in ("tokenizer", "prefill", "decode", "decode2", "decode3"):
            running.start(name, name.rstrip("23"), at[name])
        running.start("gateway", "gateway", at["gateway"])
        running.start("gateway_disagg", "gateway", at["gateway_disagg"], disagg)
        running.start("gateway_replicas", "gateway", at["gateway_replicas"], replicas)
        yield running
    finally:
        running.stop_all()
