"""A node's YAML: which artifact it serves, how the runtime runs, and each service's settings.

    artifact: artifacts/smollm2-135m-instruct
    runtime: {num_threads: 2, max_batch_size: 16}
    decode: {address: "127.0.0.1:50063"}
    gateway: {address: "0.0.0.0:50060", tokenizer: "127.0.0.1:50061", decode: ["127.0.0.1:50063"]}

Each service process reads the whole file once in its `__main__` and uses its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.config import RuntimeConfig, check_types, from_dict, read_yaml
from runtime.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """Settings every service has."""

    address: str = "127.0.0.1:0"  # host:port to listen on; port 0 picks a free one
    max_message_bytes: int = 16 * 2**20  # gRPC receive/send limit per message
    drain_seconds: float = 10.0  # on SIGTERM, how long in-flight streams may finish

    def __post_init__(self) -> None:
        check_types(self)
        if ":" not in self.address:
            raise ConfigError(f"address: {self.address!r} must be host:port")


@dataclass(frozen=True)
class PrefillConfig(ServerConfig):
    kv_lease_seconds: float = 30.0  # a prefilled KV cache not pulled within this is freed
    kv_chunk_bytes: int = 1 * 2**20  # KV travels in chunks of at most this size (<= 2 MiB)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 4096 <= self.kv_chunk_bytes <= 2 * 2**20:
            raise ConfigError(f"kv_chunk_bytes: {self.kv_chunk_bytes} must be between 4 KiB and 2 MiB")


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    tokenizer: str = "127.0.0.1:50061"  # tokenizer service
    decode: tuple[str, ...] = (
        "127.0.0.1:50063",
    )  # decode replicas; a request goes to one, retried on another
    prefill: tuple[str, ...] = ()  # prefill replicas; empty = decode runs prompts itself (co-located)
    max_prompt_bytes: int = 256 * 1024  # a longer prompt is refused with INVALID_ARGUMENT
    max_tokens_limit: int = 8192  # a request asking for more new tokens is refused
    max_stop_strings: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.decode:
            raise ConfigError("decode: list at least one decode address")


@dataclass(frozen=True)
class NodeConfig:
    artifact: str = "artifacts/smollm2-135m-instruct"  # the artifact directory every service loads
    model: str = ""  # the name apps use; empty = the artifact directory's name
    log_level: str = "INFO"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tokenizer: ServerConfig = field(default_factory=lambda: ServerConfig(address="127.0.0.1:50061"))
    prefill: PrefillConfig = field(default_factory=lambda: PrefillConfig(address="127.0.0.1:50062"))
    decode: ServerConfig = field(default_factory=lambda: ServerConfig(address="127.0.0.1:50063"))
    gateway: GatewayConfig = field(default_factory=lambda: GatewayConfig(address="127.0.0.1:50060"))

    def __post_init__(self) -> None:
        check_types(self)

    @property
    def model_name(self) -> str:
        return self.model or Path(self.artifact).name


def load_node_config(path: str | Path | None) -> NodeConfig:
    """The node's config; None gives the defaults (all services on this host)."""
    if path is None:
        return NodeConfig()
    return from_dict(NodeConfig, read_yaml(path), str(path))
