"""When to run a prompt on a prefill node and move its KV cache, and when to let decode prefill it.

    split TTFT ~ n / remote_prefill_tokens_per_s            (the prefill node runs the prompt)
               + n * kv_bytes_per_token / link bandwidth    (its KV cache crosses the link)
               + 2 * link RTT + split_overhead_ms           (Prefill and PullKv calls, admission)
    local TTFT ~ n / local_prefill_tokens_per_s             (the decode node runs the prompt itself)

A request is split when its estimated split TTFT is below the local one. Both sides grow linearly in
the prompt length n, so with a faster prefill node there is one break-even length: shorter prompts stay
on decode, longer ones are split; when the link moves KV slower than decode prefills it, nothing is
split. The figures come from the gateway's config: measured by benchmarks/split_handoff.py (link
bandwidth and RTT with the link in place, prefill tokens/s of each node), or set by hand; the KV bytes
per token are the artifact's. Plain Python, no gRPC: the gateway asks `should_split(n)` per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SPLIT_POLICIES = ("always", "never", "auto")


@dataclass(frozen=True)
class SplitEstimate:
    prompt_tokens: int
    local_ms: float  # the decode node prefills the prompt itself
    split_ms: float  # prefill node + KV over the link
    kv_bytes: int  # what crosses the link when split

    @property
    def split(self) -> bool:
        return self.split_ms < self.local_ms


@dataclass(frozen=True)
class SplitPolicy:
    mode: str = "always"  # always | never | auto (the cost model)
    link_bandwidth_mbps: float = 1000.0
    link_rtt_ms: float = 1.0
    local_prefill_tokens_per_s: float = 800.0
    remote_prefill_tokens_per_s: float = 800.0
    kv_bytes_per_token: int = 0
    split_overhead_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_POLICIES:
            raise ValueError(f"split_policy: {self.mode!r} is not one of {', '.join(SPLIT_POLICIES)}")
        if self.mode == "auto" and self.kv_bytes_per_token <= 0:
            raise ValueError("kv_bytes_per_token: the auto split policy needs it (> 0)")
        for name in ("link_bandwidth_mbps", "local_prefill_tokens_per_s", "remote_prefill_tokens_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config, kv_bytes_per_token: int) -> SplitPolicy:
        """From a GatewayConfig; `kv_bytes_per_token` is used when the config leaves it at 0."""
        return cls(
            mode=config.split_policy,
            link_bandwidth_mbps=config.link_bandwidth_mbps,
            link_rtt_ms=config.link_rtt_ms,
            local_prefill_tokens_per_s=config.local_prefill_tokens_per_s,
            remote_prefill_tokens_per_s=config.remote_prefill_tokens_per_s,
            kv_bytes_per_token=config.kv_bytes_per_token or kv_bytes_per_token,
            split_overhead_ms=config.split_overhead_ms,
        )

    def estimate(self, prompt_tokens: int) -> SplitEstimate:
        n = prompt_tokens
        kv_bytes = n * self.kv_bytes_per_token
        transfer_ms = kv_bytes * 8 / (self.link_bandwidth_mbps * 1e6) * 1e3
        split_ms = (
            n / self.remote_prefill_tokens_per_s * 1e3
            + transfer_ms
            + 2 * self.link_rtt_ms
            + self.split_overhead_ms
        )
        return SplitEstimate(n, n / self.local_prefill_tokens_per_s * 1e3, split_ms, kv_bytes)

    def should_split(self, prompt_tokens: int) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        return self.estimate(prompt_tokens).split

    def break_even_tokens(self) -> int | None:
        """The shortest prompt the auto policy splits; None when it splits none."""
        if self.mode != "auto":
            return 1 if self.mode == "always" else None
        per_token_gain_ms = (
            1e3 / self.local_prefill_tokens_per_s
            - 1e3 / self.remote_prefill_tokens_per_s
            - self.kv_bytes_per_token * 8 / (self.link_bandwidth_mbps * 1e6) * 1e3
        )
        if per_token_gain_ms <= 0:
            return None
        fixed_ms = 2 * self.link_rtt_ms + self.split_overhead_ms
        return math.floor(fixed_ms / per_token_gain_ms) + 1
