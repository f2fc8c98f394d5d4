"""`docker compose up` for real: a Docker engine, the images built here, the stack, calls from the host.

    engine.sh start -> build-images.sh -> compose up --wait (two decode replicas) -> gateway generations,
    a media burst merge -> one decode replica stopped, generations still served -> compose down -> engine stop

It installs Docker (apt) and builds every image (mmdebstrap base, runtime, media, export with torch), then
exports the model inside the export container: minutes of a 2-core machine. So it runs in CI (CI=true,
where `make test` runs it) or when EDGE_COMPOSE_TEST=1, and skips otherwise. The engine and the stack
are stopped whatever happens (fixture finalizers; .ci/run also stops the engine on exit).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from services.client import EdgeClient
from services.media.client import MediaClient
from services.media.synthetic import make_burst

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "deploy" / "scripts" / "engine.sh"
PROJECT = "edge-ci"
ENABLED = os.environ.get("CI") == "true" or os.environ.get("EDGE_COMPOSE_TEST") == "1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ENABLED, reason="installs Docker and builds images: set CI=true or EDGE_COMPOSE_TEST=1"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(env: dict, *command: str, timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{shlex.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def docker_env():
    """A started engine; the environment that points the docker CLI at it. Stopped at the end."""
    env = dict(os.environ)
    try:
        exports = _run(env, str(ENGINE), "start", timeout=240)  # installs docker.io + compose when missing
        for assignment in shlex.split(exports.strip().removeprefix("export ")):
            name, value = assignment.split("=", 1)
            env[name] = value
        _run(env, "deploy/scripts/build-images.sh", timeout=480)
        yield env
    finally:
        subprocess.run([str(ENGINE), "stop"], cwd=ROOT, timeout=120, check=False)


@pytest.fixture(scope="module")
def stack(docker_env):
    """The compose stack with two decode replicas; its published ports. Brought down at the end."""
    env = dict(docker_env)
    env.update(
        EDGE_GATEWAY_PORT=str(_free_port()), EDGE_MEDIA_PORT=str(_free_port()), EDGE_DECODE_REPLICAS="2"
    )
    compose = ("docker", "compose", "-p", PROJECT)
    try:
        _run(env, *compose, "up", "--wait", "--wait-timeout", "420", "--no-build", timeout=450)
        yield {
            "gateway": f"127.0.0.1:{env['EDGE_GATEWAY_PORT']}",
            "media": f"127.0.0.1:{env['EDGE_MEDIA_PORT']}",
        }
    finally:
        subprocess.run([*compose, "down", "--volumes", "--timeout", "30"], cwd=ROOT, env=env, timeout=120)


def _decode_containers(env: dict) -> list[str]:
    out = _run(env, "docker", "compose", "-p", PROJECT, "ps", "-q", "decode")
    return out.split()


def _generations_served(env: dict, container: str) -> int:
    """Decode.Generate calls the replica finished, from its JSON log lines."""
    logs = subprocess.run(["docker", "logs", container], env=env, capture_output=True, text=True).stderr
    count = 0
    for line in logs.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            count += entry.get("msg") == "rpc ok" and str(entry.get("method", "")).endswith("Generate")
    return count


def _served_at_least(env: dict, container: str, count: int) -> int:
    """Its Decode.Generate count once it reaches `count` (the log line trails the stream by a moment),
    or whatever it is after 20 s."""
    for _ in range(40):
        served = _generations_served(env, container)
        if served >= count:
            return served
        time.sleep(0.5)
    return served


def _generate(address: str, prompt: str):
    with EdgeClient(address, timeout=120) as client:
        return client.complete(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)


def test_gateway_generates_and_balances_over_decode_replicas(stack, docker_env):
    first = _generate(stack["gateway"], "The capital of France is")
    assert first.completion_tokens == 6 and first.finish_reason == "length" and first.text.strip()
    assert first.prompt_tokens > 0

    replicas = _decode_containers(docker_env)
    assert len(replicas) == 2
    for i in range(7):
        assert _generate(stack["gateway"], f"Count to {i + 3}:").completion_tokens == 6
    for _ in range(40):  # a replica logs "rpc ok" a moment after the stream's last message
        served = Counter({c: _generations_served(docker_env, c) for c in replicas})
        if sum(served.values()) >= 8:
            break
        time.sleep(0.5)
    assert sum(served.values()) == 8 and min(served.values()) > 0, served  # round_robin used both

    stopped, survivor = replicas
    _run(docker_env, "docker", "stop", "--time", "30", stopped)  # drains, exits; restart policy leaves it
    for i in range(4):
        assert _generate(stack["gateway"], f"After the stop, {i}:").completion_tokens == 6
    assert _served_at_least(docker_env, survivor, served[survivor] + 4) == served[survivor] + 4


def test_media_merges_a_burst_from_the_host(stack):
    burst = make_burst(_scene(), 4, (192, 256), "high", seed=3, object_radius=0)
    frames = [cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in burst.frames]
    with MediaClient(stack["media"], timeout=120) as media:
        reply = media.merge_burst(frames, reference=burst.reference, format="png")
    merged = cv2.cvtColor(cv2.imdecode(np.frombuffer(reply.files["image"], np.uint8), 1), cv2.COLOR_BGR2RGB)
    assert (reply.width, reply.height) == (256, 192)
    truth = burst.clean[burst.reference]
    error_merged = np.abs(merged / 255.0 - truth).mean()
    error_single = np.abs(burst.frames[burst.reference] / 255.0 - truth).mean()
    assert error_merged < error_single  # four frames merged carry less noise than the reference alone


def _scene() -> np.ndarray:
    """A smooth random texture (no bundled photos needed), float32 RGB in [0, 1]."""
    rng = np.random.default_rng(0)
    noise = rng.random((120, 160, 3), dtype=np.float32)
    return cv2.resize(cv2.GaussianBlur(noise, (0, 0), 2.0), (640, 480), interpolation=cv2.INTER_CUBIC)


def test_the_same_file_renders_as_a_swarm_stack_with_placement(docker_env):
    """docker-compose.yml + deploy/swarm.yml -> a stack file that `docker stack config` accepts."""
    stack = yaml.safe_load(_run(docker_env, sys.executable, "deploy/scripts/stack.py", "render"))
    services = stack["services"]
    assert services["prefill"]["deploy"]["placement"]["constraints"] == ["node.labels.edge.gpu == true"]
    for name in ("tokenizer", "decode", "gateway", "media"):
        assert services[name]["deploy"]["placement"]["constraints"] == ["node.labels.edge.cpu == true"]
    assert services["decode"]["deploy"]["endpoint_mode"] == "dnsrr"  # the name resolves to every task
    assert services["decode"]["deploy"]["replicas"] == 2
    assert all("depends_on" not in s and "build" not in s for s in services.values())
    assert {p["target"] for s in services.values() for p in s.get("ports", [])} == {50060, 50064}
    _run(docker_env, sys.executable, "deploy/scripts/stack.py", "check")
