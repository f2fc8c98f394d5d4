"""Runtime configuration: YAML -> a frozen dataclass, read once at start-up.

Every field has a default and a one-line docstring (the comment beside it). Unknown keys and
wrong types raise `ConfigError` naming the file, the key and what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from runtime.errors import ConfigError

ATTENTION_KERNELS = ("auto", "native", "function")


@dataclass(frozen=True)
class RuntimeConfig:
    """How one node runs an artifact."""

    num_threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per CPU core
    attention_kernel: str = (
        "auto"  # native: our compiled kernel; function: the ONNX body; auto: native if built
    )
    block_size: int = 16  # tokens per KV block
    max_seq_len: int = 0  # longest sequence (prompt + output) accepted; 0 = the model's context
    max_batch_size: int = 8  # sequences decoded together in one step
    kv_cache_bytes: int = 0  # KV pool size; 0 = room for max_batch_size sequences of max_seq_len
    max_step_tokens: int = 512  # tokens computed in one step; longer prompts are prefilled in chunks
    max_queue: int = 64  # requests waiting for KV memory before new ones are refused

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = int if f.type == "int" else str
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"{f.name}: expected {f.type}, got {value!r} ({type(value).__name__})")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"attention_kernel: {self.attention_kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}"
            )
        for name in ("block_size", "max_batch_size", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("num_threads", "max_seq_len", "kv_cache_bytes", "max_queue"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


def config_from_dict(values: dict, source: str = "config") -> RuntimeConfig:
    known = {f.name for f in dataclasses.fields(RuntimeConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{key}'; known keys: {', '.join(sorted(known))}")
    try:
        return RuntimeConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, section: str | None = "runtime") -> RuntimeConfig:
    """Read a YAML file; with `section`, the runtime settings live under that key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    if section is not None:
        data = data.get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping under '{section}'")
    return config_from_dict(data, str(path))
