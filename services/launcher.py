"""Start and stop the services of one node as local processes (README command one, and the tests).

    up(config)   -> each service runs `python -m services.<name> --config CONFIG` in the background,
                    logs in .run/<name>.log, pid in .run/<name>.pid; returns once all are SERVING
    down()       -> SIGTERM (graceful drain), then SIGKILL after a timeout

docker-compose.yml runs the same commands, one container per service.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import NodeConfig, load_node_config

SERVICES = ("tokenizer", "prefill", "decode", "gateway", "media")
RUN_DIR = Path(".run")


@dataclass
class Service:
    name: str
    address: str  # where clients on this host reach it
    process: subprocess.Popen | None = None


def free_port() -> int:
    """A TCP port nothing listens on now (for tests and benchmarks that start their own stack)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str, config: str | Path | None, address: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", f"services.{name}"]
    if config is not None:
        cmd += ["--config", str(config)]
    if address is not None:
        cmd += ["--address", address]
    return cmd


def local_address(address: str) -> str:
    host, port = address.rsplit(":", 1)
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"


def service_addresses(node: NodeConfig) -> dict[str, str]:
    return {name: local_address(getattr(node, name).address) for name in SERVICES}


def wait_serving(address: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Block until the health service at `address` says SERVING; raise if it never does."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service at {address} exited with status {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the service at {address} was not SERVING after {timeout:.0f} s")


def start(name: str, config, address: str | None, run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / f"{name}.log").open("ab")
    process = subprocess.Popen(
        command(name, config, address),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    (run_dir / f"{name}.pid").write_text(str(process.pid))
    return process


def up(config: str | Path | None, run_dir: Path = RUN_DIR, timeout: float = 120.0) -> dict[str, Service]:
    node = load_node_config(config)
    services = {}
    for name, address in service_addresses(node).items():
        services[name] = Service(name, address, start(name, config, None, run_dir))
    for service in services.values():
        wait_serving(service.address, timeout, service.process)
    return services


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def down(run_dir: Path = RUN_DIR) -> list[str]:
    stopped = []
    for pid_file in sorted(run_dir.glob("*.pid")):
        stop_pid(int(pid_file.read_text()))
        pid_file.unlink()
        stopped.append(pid_file.stem)
    return stopped
