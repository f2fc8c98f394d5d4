"""The node profiles in deploy/config/ and the shape of docker-compose.yml, checked without an engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runtime.engine import Engine
from runtime.sampling import SamplingParams
from services.common.config import load_node_config

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "deploy" / "config"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PUBLISHED = {"gateway", "media"}


@pytest.mark.parametrize(
    "name", ["cpu", "gpu", "volta", "npu", "cluster", "local"], ids=lambda n: f"{n}.yaml"
)
def test_every_profile_loads(name):
    node = load_node_config(PROFILES / f"{name}.yaml")
    assert node.gateway.decode and node.model_name
    if name != "local":
        assert node.artifact.startswith("/artifacts/")  # the compose volume
        assert all(getattr(node, s).address.startswith("0.0.0.0:") for s in ("tokenizer", "decode"))


@pytest.mark.parametrize("name", ["cpu", "npu"])
def test_cpu_runnable_profiles_generate(name, tiny_artifact):
    """The runtime settings of the profiles this machine can run, on the tiny model."""
    runtime = load_node_config(PROFILES / f"{name}.yaml").runtime
    engine = Engine.from_artifact(tiny_artifact, runtime)
    events = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)))
    assert len(events) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpu", "volta"])
def test_gpu_profiles_generate(name, tiny_artifact):
    runtime = load_node_config(PROFILES / f"{name}.yaml").runtime
    engine = Engine.from_artifact(tiny_artifact, runtime)
    events = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)))
    assert len(events) == 4


def test_every_profile_is_a_compose_config():
    declared = {Path(c["file"]).stem for c in COMPOSE["configs"].values()}
    assert declared == {p.stem for p in PROFILES.glob("*.yaml")} - {"local"}


def test_compose_services_have_init_health_and_publish_only_gateway_and_media():
    services = COMPOSE["services"]
    assert {"export", "tokenizer", "prefill", "decode", "gateway", "media"} <= set(services)
    for name, service in services.items():
        assert service.get("init") is True, name
        assert bool(service.get("ports")) == (name in PUBLISHED), name
        if name == "export":
            assert service["restart"] == "no"
            continue
        assert service["healthcheck"]["test"][:3] == ["CMD", "edge", "health"], name
        if name != "media":  # media needs no model: it starts without waiting for the export
            assert service["depends_on"]["export"]["condition"] == "service_completed_successfully"
