"""Configuration: YAML -> frozen dataclasses, read once at start-up.

Every field has a default and a one-line docstring (the comment beside it). `from_dict` builds
any of these dataclasses from a mapping: unknown keys and wrong types raise `ConfigError` naming
the file, the key and what to change (YAML reads `1e-5` as a string and `on` as True, so types
are checked, not trusted).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from runtime.errors import ConfigError

ATTENTION_KERNELS = ("auto", "native", "function", "triton", "volta", "npu", "offload", "torch")
TORCH_ATTENTION_KERNELS = ("triton", "volta", "npu", "offload", "torch")  # the torch backend's choices
BACKENDS = ("onnxruntime", "torch")
DEVICES = ("auto", "cuda", "cpu")
COMPUTE_DTYPES = ("auto", "fp32", "fp16")
T = TypeVar("T")


@dataclass(frozen=True)
class RuntimeConfig:
    """How one node runs an artifact."""

    num_threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per CPU core
    # onnxruntime: native (our compiled kernel), function (the ONNX body), auto (native if built). torch:
    # triton (FA2 + split-KV decode), volta (their sm70 tiles, fp16), npu (two-level tiling, tiling-mask),
    # offload (KV over kv_gpu_bytes in pinned host memory), torch (the spec); auto = triton on CUDA fp16
    attention_kernel: str = "auto"
    block_size: int = 16  # tokens per KV block
    max_seq_len: int = 0  # longest sequence (prompt + output) accepted; 0 = the model's context
    max_batch_size: int = 8  # sequences decoded together in one step
    kv_cache_bytes: int = 0  # KV pool size; 0 = 512 MiB
    max_step_tokens: int = 512  # tokens computed in one step; longer prompts are prefilled in chunks
    max_queue: int = 64  # requests waiting for KV memory before new ones are refused
    backend: str = "onnxruntime"  # onnxruntime (CPU), or torch: the artifact's weights in PyTorch (GPU nodes)
    device: str = "auto"  # torch backend: cuda, cpu, or auto (cuda when available)
    compute_dtype: str = "auto"  # torch backend: fp32, fp16, or auto (the artifact's dtype)
    cuda_graphs: bool = True  # torch backend on cuda: replay decode steps from captured CUDA graphs
    kv_gpu_bytes: int = 0  # attention_kernel offload: device bytes for KV (pool + staging); 0 = 1/8 of pool
    tensor_parallel: int = 1  # torch backend: ranks the model is split over (torchrun: tensor_parallel.py)
    allreduce_chunks: int = 4  # tensor_parallel: all-reduce row chunks (tiling-AllReduce), >= 1024 rows each

    def __post_init__(self) -> None:
        check_types(self)
        for name, allowed in (
            ("attention_kernel", ATTENTION_KERNELS),
            ("backend", BACKENDS),
            ("device", DEVICES),
            ("compute_dtype", COMPUTE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        torch_only = self.attention_kernel in TORCH_ATTENTION_KERNELS or self.tensor_parallel > 1
        if self.backend != "torch" and torch_only:
            raise ConfigError(
                f"attention_kernel: {self.attention_kernel} / tensor_parallel: {self.tensor_parallel} need "
                "backend: torch"
            )
        positive = ("block_size", "max_batch_size", "max_step_tokens", "tensor_parallel", "allreduce_chunks")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("num_threads", "max_seq_len", "kv_cache_bytes", "max_queue", "kv_gpu_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


def check_types(obj) -> None:
    """Raise ConfigError for a field whose value does not have its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, expected = getattr(obj, f.name), hints[f.name]
        if not _has_type(value, expected):
            raise ConfigError(f"{f.name}: expected {f.type}, got {value!r} ({type(value).__name__})")


def _has_type(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(expected) if a is not Ellipsis}
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if dataclasses.is_dataclass(expected):
        return isinstance(value, expected)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def from_dict(cls: type[T], values: dict | None, source: str = "config") -> T:
    """Build dataclass `cls` from a mapping; nested dataclass fields take nested mappings."""
    if not isinstance(values or {}, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(values).__name__}")
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{key}'; known keys: {', '.join(sorted(known))}")
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = from_dict(hints[name], value, f"{source}: {name}")
        elif typing.get_origin(hints[name]) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_from_dict(values: dict, source: str = "config") -> RuntimeConfig:
    return from_dict(RuntimeConfig, values, source)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path, section: str | None = "runtime") -> RuntimeConfig:
    """Read a YAML file; with `section`, the runtime settings live under that key."""
    data = read_yaml(path)
    if section is not None:
        data = data.get(section) or {}
    return config_from_dict(data, str(path))
