"""When to run a prompt on a prefill node and move its KV cache, and when to let decode prefill it.

    split TTFT ~ n / remote_prefill_tokens_per_s            (the prefill node runs the prompt)
               + kv_bytes(n) / link bandwidth               (its KV cache crosses the link)
               + 2 * link RTT + split_overhead_ms           (Prefill and PullKv calls, admission)
    local TTFT ~ n / local_prefill_tokens_per_s             (the decode node runs the prompt itself)

A request is split when its estimated split TTFT is below the local one. kv_bytes(n) is what the
handoff moves: the artifact's (Artifact.kv_handoff_bytes), or n * kv_bytes_per_token when the gateway's
config sets that (a linear model). With a linear cost both sides grow linearly in the prompt length n,
so with a faster prefill node there is one break-even length: shorter prompts stay on decode, longer
ones are split; when the link moves KV slower than decode prefills it, nothing is split. An SAQ cache's
handoff is not linear (the open stage travels in fp16, closed stages as records that shrink as they
age), so the split prompts need not be one range: break_even_tokens searches for the shortest. The
figures come from the gateway's config: measured by benchmarks/split_handoff.py (link bandwidth and RTT
with the link in place, prefill tokens/s of each node), or set by hand. Plain Python, no gRPC: the
gateway asks `should_split(n)` per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SPLIT_POLICIES = ("always", "never", "auto")
MAX_PROMPT_TOKENS = 32768  # break_even_tokens' search bound when the gateway does not know the context


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
    kv_bytes_per_token: int = 0  # > 0: kv_bytes(n) = n * kv_bytes_per_token (a linear model)
    split_overhead_ms: float = 5.0
    kv_handoff_bytes: Callable[[int], int] | None = None  # else kv_bytes(n) (Artifact.kv_handoff_bytes)
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # break_even_tokens searches prompts up to this length

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_POLICIES:
            raise ValueError(f"split_policy: {self.mode!r} is not one of {', '.join(SPLIT_POLICIES)}")
        if self.mode == "auto" and self.kv_bytes_per_token <= 0 and self.kv_handoff_bytes is None:
            raise ValueError(
                "kv_bytes_per_token: the auto split policy needs it (> 0) or the artifact's KV size"
            )
        for name in ("link_bandwidth_mbps", "local_prefill_tokens_per_s", "remote_prefill_tokens_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_config(
        cls,
        config,
        kv_bytes_per_token: int = 0,
        *,
        kv_handoff_bytes: Callable[[int], int] | None = None,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    ) -> SplitPolicy:
        """From a GatewayConfig. The KV cost: the config's kv_bytes_per_token when set (linear), else the
        artifact's `kv_handoff_bytes`, else `kv_bytes_per_token` (linear)."""
        manual = config.kv_bytes_per_token
        return cls(
            mode=config.split_policy,
            link_bandwidth_mbps=config.link_bandwidth_mbps,
            link_rtt_ms=config.link_rtt_ms,
            local_prefill_tokens_per_s=config.local_prefill_tokens_per_s,
            remote_prefill_tokens_per_s=config.remote_prefill_tokens_per_s,
            kv_bytes_per_token=manual or (0 if kv_handoff_bytes else kv_bytes_per_token),
            split_overhead_ms=config.split_overhead_ms,
            kv_handoff_bytes=None if manual else kv_handoff_bytes,
            max_prompt_tokens=max_prompt_tokens,
        )

    def kv_bytes(self, prompt_tokens: int) -> int:
        """What crosses the link when an n-token prompt is split."""
        if self.kv_bytes_per_token > 0 or self.kv_handoff_bytes is None:
            return prompt_tokens * self.kv_bytes_per_token
        return self.kv_handoff_bytes(prompt_tokens)

    def estimate(self, prompt_tokens: int) -> SplitEstimate:
        n = prompt_tokens
        kv_bytes = self.kv_bytes(n)
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
        """The shortest prompt the auto policy splits; None when it splits none (up to max_prompt_tokens
        for a non-linear KV cost). With a linear cost every longer prompt is split too."""
        if self.mode != "auto":
            return 1 if self.mode == "always" else None
        prefill_gain_ms = 1e3 / self.local_prefill_tokens_per_s - 1e3 / self.remote_prefill_tokens_per_s
        fixed_ms = 2 * self.link_rtt_ms + self.split_overhead_ms
        if self.kv_bytes_per_token > 0:
            per_token_gain_ms = (
                prefill_gain_ms - self.kv_bytes_per_token * 8 / (self.link_bandwidth_mbps * 1e6) * 1e3
            )
            if per_token_gain_ms <= 0:
                return None
            return math.floor(fixed_ms / per_token_gain_ms) + 1
        # Not linear: search. Even a free transfer pays only once n * prefill_gain_ms > fixed_ms.
        if prefill_gain_ms <= 0:
            return None
        first = max(1, math.floor(fixed_ms / prefill_gain_ms))
        return next((n for n in range(first, self.max_prompt_tokens + 1) if self.estimate(n).split), None)
