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

from kernels.kv_formats import SAQ_FORMAT, SaqFormat
from runtime.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.yaml"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
SUPPORTED_ATTENTION_OP = ("fastattention", "FlashAttention", 1)
SAQ_ATTENTION_OP = ("fastattention", "FlashAttentionSaq", 1)  # the op of an SAQ graph (no function body)


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
    saq: SaqFormat | None = None  # the staircase of an SAQ cache (manifest kv_cache.saq)

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
        """K and V of one token over all layers, in the artifact's KV format (scales included; SAQ: the
        bottom stair's record over its stage, rounded up, without the per-sequence slot)."""
        from runtime.kv_cache import pool_bytes_per_token

        return pool_bytes_per_token(self.pool_tensors(), self.model.num_layers, self.block_size or 1)

    def kv_handoff_bytes(self, tokens: int) -> int:
        """Bytes a prefill -> decode handoff of a `tokens`-token prompt moves, over all layers (what
        Engine.export_kv returns): tokens * kv_bytes_per_token for a per-token format; SAQ: the records of
        its bottom-stair stages and its slot's bytes in use (SaqFormat.handoff_bytes), not linear."""
        if self.saq is not None:
            return self.model.num_layers * self.saq.handoff_bytes(tokens)
        return tokens * self.kv_bytes_per_token

    @property
    def block_size(self) -> int | None:
        """Tokens per KV block when the format fixes it (SAQ: a block holds one stage), else None."""
        return self.saq.stage if self.saq is not None else None

    @property
    def kv_spec(self) -> str:
        """The KV format with its parameters ("fp16", "int8", "saq 8:1,4:4,2;stage=64;v_group=32"): KV
        moves only between nodes whose specs are equal."""
        return f"{self.kv_format} {self.saq.text()}" if self.saq is not None else self.kv_format

    def pool_tensors(self):
        """The tensors of one layer's KV pool (runtime.kv_cache.PoolTensor)."""
        from runtime.kv_cache import pool_tensors

        m = self.model
        saq = self.saq.text() if self.saq is not None else ""
        return pool_tensors(self.kv_format, m.num_kv_heads * m.head_dim, m.head_dim, saq)


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
    kv_format = str(manifest["kv_cache"]["format"])
    op = manifest["graph"]["attention_op"]
    supported = [SUPPORTED_ATTENTION_OP] + ([SAQ_ATTENTION_OP] if kv_format == SAQ_FORMAT else [])
    if (op["domain"], op["name"], op["version"]) not in supported:
        names = " or ".join(f"{d}::{n} v{v}" for d, n, v in supported)
        raise ArtifactError(
            f"{path}: attention op {op['domain']}::{op['name']} v{op['version']} is not one this runtime "
            f"runs for KV format {kv_format} ({names}); re-export"
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
        kv_format=kv_format,
        saq=_saq_format(path, manifest["kv_cache"], model) if kv_format == SAQ_FORMAT else None,
    )


def _saq_format(path: Path, kv_cache: dict, model: ModelSpec) -> SaqFormat:
    """kv_cache.saq parsed for the model's KV width; the manifest's stage and sizes must agree with it."""
    text = kv_cache.get("saq")
    where = f"{path / MANIFEST_FILE}: kv_cache"
    if not isinstance(text, str) or not text.strip():
        raise ArtifactError(
            f"{where}.saq is {text!r}; an SAQ cache needs its staircase text (e.g. "
            "'8:1,4:4,2;stage=64;v_group=32'); re-run export-model"
        )
    try:
        fmt = SaqFormat.parse(text, model.num_kv_heads * model.head_dim)
    except ValueError as e:
        raise ArtifactError(f"{where}.saq {text!r}: {e}; re-run export-model") from None
    if "stage" not in kv_cache:
        raise ArtifactError(f"{where}.stage is missing (the SAQ block size); re-run export-model")
    for key, value in (
        ("stage", fmt.stage),
        ("stairs", fmt.stairs_text),
        ("v_group", fmt.v_group),
        ("block_bytes", fmt.block_bytes),
        ("slot_bytes", fmt.slot_bytes),
    ):
        if key in kv_cache and kv_cache[key] != value:
            raise ArtifactError(
                f"{where}.{key} is {kv_cache[key]!r}, but kv_cache.saq {text!r} gives {value}; the "
                "manifest contradicts itself, re-run export-model"
            )
    return fmt
