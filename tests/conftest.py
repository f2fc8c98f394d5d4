"""Shared fixtures: exported artifacts of the embedded model and of tiny random models.

Exports of the embedded SmolLM2 take a minute or two each, so they are cached under
`.cache/test-artifacts/`, keyed by the export options and a hash of the exporter's sources:
editing the exporter re-exports, a clean clone exports once per option set.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from exporters.cli import embedded_model_path
from exporters.onnx_export import ExportOptions, export_artifact
from runtime.artifact import MANIFEST_FILE

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "test-artifacts"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _source_hash() -> str:
    digest = hashlib.sha256()
    for folder in ("exporters", "kernels"):
        for path in sorted((ROOT / folder).glob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cached_export(checkpoint_path: Path, options: ExportOptions, name: str) -> Path:
    from exporters.checkpoint import open_checkpoint

    kv = options.kv_dtype + (
        f"-{hashlib.sha256(options.kv_saq.encode()).hexdigest()[:8]}" if options.kv_saq else ""
    )
    out = CACHE / f"{name}-{options.weights}-{options.compute}-{options.dtype}-kv{kv}-{_source_hash()}"
    if not (out / MANIFEST_FILE).is_file():
        export_artifact(open_checkpoint(checkpoint_path), out, options, replace=True)
    return out


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def smollm2_fp32(embedded_gguf) -> Path:
    """The embedded model dequantized to fp32 weights: the graph matches the reference to 1e-4."""
    return cached_export(
        embedded_gguf, ExportOptions(weights="fp", compute="fp32", progress=False), "smollm2"
    )


@pytest.fixture(scope="session")
def smollm2_default(embedded_gguf) -> Path:
    """The embedded model as `export-model` writes it by default (carried blocks, int8 compute)."""
    return cached_export(embedded_gguf, ExportOptions(progress=False), "smollm2")


@pytest.fixture(scope="session")
def reference_model(embedded_gguf):
    """The PyTorch fp32 reference of the embedded model (weights dequantized by the gguf package)."""
    from exporters.checkpoint import open_checkpoint
    from exporters.model import Llama
    from exporters.onnx_export import plan_weights

    checkpoint = open_checkpoint(embedded_gguf)
    plan = plan_weights(checkpoint, ExportOptions(weights="fp", compute="fp32", progress=False))
    return Llama(checkpoint.config, plan.tensors).eval()


@pytest.fixture(scope="session")
def native_kernel_available() -> bool:
    from kernels import attention_cpu

    available = attention_cpu.library_path() is not None
    if not available and os.environ.get("CI"):
        pytest.fail("the CPU attention kernel is not built in CI; `make kernels` must run first")
    return available


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """A 2-layer random model (context 256) exported with fp32 weights: fast engine tests."""
    from exporters.checkpoint import open_checkpoint
    from tests.models import write_tiny_gguf

    folder = tmp_path_factory.mktemp("tiny")
    gguf_path = write_tiny_gguf(folder / "tiny.gguf")
    options = ExportOptions(weights="fp", compute="fp32", progress=False)
    return export_artifact(open_checkpoint(gguf_path), folder / "artifact", options)
