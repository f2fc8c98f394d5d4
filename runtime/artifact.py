"""The model artifact on disk: what `export-model` writes and every service loads.

    <dir>/manifest.yaml     format version, model dimensions, graph, KV layout, tokenizer, files
    <dir>/model.onnx        the serving graph (see exporters/onnx_export.py)
    <dir>/model.onnx.data   its weights
    <dir>/tokenizer.json

`load_artifact` refuses a directory whose manifest is missing, of another format version, or whose
files do not match their recorded size and sha256, naming the file and what to do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from runtime.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.yaml"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
SUPPORTED_ATTENTION_OP = ("fastattention", "FlashAttention", 1)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, body: dict) -> Path:
    """Write manifest.yaml with `body` plus the size and sha256 of every other file in `directory`."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"format_version": FORMAT_VERSION, **body, "files": files}
    path = directory / MANIFEST_FILE
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=100))
    return path


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions the runtime needs from the manifest."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory."""

    path: Path
    manifest: dict
    model: ModelSpec
    dtype: str  # activations and KV cache: fp32 or fp16
    kv_format: str

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest["graph"]["file"]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    @property
    def tokenizer_info(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in the artifact's KV format (scales included)."""
        from runtime.kv_cache import bytes_per_token

        m = self.model
        return bytes_per_token(self.kv_format, m.num_layers, m.num_kv_heads * m.head_dim, m.head_dim)

    def pool_tensors(self):
        """The tensors of one layer's KV pool (runtime.kv_cache.PoolTensor)."""
        from runtime.kv_cache import pool_tensors

        return pool_tensors(
            self.kv_format, self.model.num_kv_heads * self.model.head_dim, self.model.head_dim
        )


def load_artifact(path: str | Path, *, verify: bool = True) -> Artifact:
    """Read and check an artifact directory; `verify` also re-hashes every file."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a directory; run `export-model --out {path}` first")
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing; {path} is not an artifact (re-run export-model)")
    try:
        manifest = yaml.safe_load(manifest_path.read_text())
    except yaml.YAMLError as e:
        raise ArtifactError(f"{manifest_path}: not valid YAML ({e}); re-run export-model") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{manifest_path}: format_version {version!r}, this runtime reads {FORMAT_VERSION}; "
            "re-export the model"
        )
    _check_files(path, manifest.get("files") or {}, verify)
    try:
        return _artifact_from_manifest(path, manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{manifest_path}: malformed manifest ({e!r}); re-run export-model") from e


def _check_files(path: Path, files: dict, verify: bool) -> None:
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if required not in files:
            raise ArtifactError(f"{path / MANIFEST_FILE}: lists no {required}; re-run export-model")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing from the artifact; re-run export-model")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"{file}: {size} bytes, the manifest says {entry['bytes']}; the file is truncated or "
                "changed, re-run export-model"
            )
        if verify and sha256_file(file) != entry["sha256"]:
            raise ArtifactError(
                f"{file}: sha256 does not match the manifest; the file is corrupted, re-export"
            )


def _artifact_from_manifest(path: Path, manifest: dict) -> Artifact:
    op = manifest["graph"]["attention_op"]
    if (op["domain"], op["name"], op["version"]) != SUPPORTED_ATTENTION_OP:
        raise ArtifactError(
            f"{path}: attention op {op['domain']}::{op['name']} v{op['version']} is not the one this runtime "
            f"runs ({SUPPORTED_ATTENTION_OP[0]}::{SUPPORTED_ATTENTION_OP[1]} v{SUPPORTED_ATTENTION_OP[2]}); "
            "re-export"
        )
    m = manifest["model"]
    model = ModelSpec(
        name=str(m["name"]),
        num_layers=int(m["num_layers"]),
        num_heads=int(m["num_heads"]),
        num_kv_heads=int(m["num_kv_heads"]),
        head_dim=int(m["head_dim"]),
        vocab_size=int(m["vocab_size"]),
        max_position_embeddings=int(m["max_position_embeddings"]),
        sliding_window=int(m.get("sliding_window", 0)),
    )
    return Artifact(
        path=path,
        manifest=manifest,
        model=model,
        dtype=str(manifest["graph"]["dtype"]),
        kv_format=str(manifest["kv_cache"]["format"]),
    )
