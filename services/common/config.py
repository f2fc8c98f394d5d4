"""A node's YAML: which artifact it serves, how the runtime runs, and each service's settings.

    artifact: artifacts/smollm2-135m-instruct
    runtime: {num_threads: 2, max_batch_size: 16}
    decode: {address: "127.0.0.1:50063"}
    gateway: {address: "0.0.0.0:50060", tokenizer: "127.0.0.1:50061", decode: ["127.0.0.1:50063"]}
    media: {address: "127.0.0.1:50064", max_frames: 16}

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
    # decode replicas; a request goes to one, retried on another. A DNS name (dns:///decode:50063)
    # that resolves to several replicas is balanced by gRPC's round_robin over all of them.
    decode: tuple[str, ...] = ("127.0.0.1:50063",)
    prefill: tuple[str, ...] = ()  # prefill replicas; empty = decode runs prompts itself (co-located)
    max_prompt_bytes: int = 256 * 1024  # a longer prompt is refused with INVALID_ARGUMENT
    max_tokens_limit: int = 8192  # a request asking for more new tokens is refused
    max_stop_strings: int = 16
    # With prefill replicas: split every request (always), none (never), or when the cost model of
    # services/gateway/split_policy.py says the link and the prompt length make it pay (auto).
    split_policy: str = "always"
    link_bandwidth_mbps: float = 1000.0  # auto: prefill -> decode link, measured or configured
    link_rtt_ms: float = 1.0  # auto: that link's round-trip time
    local_prefill_tokens_per_s: float = 800.0  # auto: prompt tokens/s of a decode node prefilling itself
    remote_prefill_tokens_per_s: float = 800.0  # auto: prompt tokens/s of a prefill node
    kv_bytes_per_token: int = 0  # auto: KV bytes per prompt token on the wire; 0 = the artifact's handoff
    split_overhead_ms: float = 5.0  # auto: fixed cost of the split path (two more calls, KV import)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.decode:
            raise ConfigError("decode: list at least one decode address")
        if self.split_policy not in ("always", "never", "auto"):
            raise ConfigError(f"split_policy: {self.split_policy!r} is not one of always, never, auto")
        for name in ("link_bandwidth_mbps", "local_prefill_tokens_per_s", "remote_prefill_tokens_per_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("link_rtt_ms", "kv_bytes_per_token", "split_overhead_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class MediaConfig(ServerConfig):
    """The media service (burst merge, long exposure, region animation) and its input limits."""

    address: str = "127.0.0.1:50064"
    max_frames: int = 16  # frames in one burst at most
    max_pixels: int = 12_000_000  # pixels in one frame at most (read from the header, before decoding)
    max_input_bytes: int = 256 * 2**20  # encoded bytes of all frames of one request together
    max_clip_frames: int = 120  # AnimateRegion loops at most this many frames
    chunk_bytes: int = 1 * 2**20  # results stream back in chunks of at most this size
    max_concurrent_jobs: int = 2  # jobs computing at once; more are refused with RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_frames", "max_pixels", "max_input_bytes", "max_clip_frames", "max_concurrent_jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"media.{name}: {getattr(self, name)} must be >= 1")
        if self.max_frames < 2:
            raise ConfigError(f"media.max_frames: {self.max_frames} must be >= 2 (a burst has two frames)")
        if not 4096 <= self.chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError(
                f"media.chunk_bytes: {self.chunk_bytes} must be between 4 KiB and half of max_message_bytes"
            )


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
    media: MediaConfig = field(default_factory=MediaConfig)

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
