"""The gateway's split policy: a cost model with no gRPC and no tensors (services/gateway/split_policy.py)."""

from __future__ import annotations

import pytest

from runtime.errors import ConfigError
from services.common.config import GatewayConfig
from services.gateway.split_policy import SplitPolicy

FP16_KV = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M: K and V, 30 layers, 3 KV heads of 64, fp16


def policy(**kw) -> SplitPolicy:
    settings = dict(
        mode="auto",
        link_bandwidth_mbps=1000.0,
        link_rtt_ms=2.0,
        local_prefill_tokens_per_s=450.0,
        remote_prefill_tokens_per_s=800.0,
        kv_bytes_per_token=FP16_KV,
        split_overhead_ms=5.0,
    )
    return SplitPolicy(**(settings | kw))


def test_a_fast_link_splits_long_prompts_only():
    p = policy()
    n = p.break_even_tokens()
    assert n is not None and 1 < n < 200
    assert not p.should_split(n - 1) and p.should_split(n) and p.should_split(4 * n)
    long = p.estimate(1000)
    assert long.kv_bytes == 1000 * FP16_KV and long.split_ms < long.local_ms


def test_a_slow_link_splits_nothing():
    p = policy(link_bandwidth_mbps=100.0)  # 23 KB/token at 12.5 MB/s: slower than prefilling locally
    assert p.break_even_tokens() is None
    assert not any(p.should_split(n) for n in (1, 64, 512, 4096, 32768))


def test_the_estimate_matches_the_formula():
    e = policy().estimate(512)
    transfer_ms = 512 * FP16_KV * 8 / 1e9 * 1e3
    assert e.split_ms == pytest.approx(512 / 800 * 1e3 + transfer_ms + 2 * 2.0 + 5.0)
    assert e.local_ms == pytest.approx(512 / 450 * 1e3)


def test_always_and_never_ignore_the_model():
    assert policy(mode="always").should_split(1) and not policy(mode="never").should_split(10**6)


def test_gateway_config_checks_the_policy_fields():
    assert GatewayConfig(split_policy="auto").split_policy == "auto"
    with pytest.raises(ConfigError, match="split_policy"):
        GatewayConfig(split_policy="sometimes")
    with pytest.raises(ConfigError, match="link_bandwidth_mbps"):
        GatewayConfig(link_bandwidth_mbps=0)
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        SplitPolicy.from_config(GatewayConfig(split_policy="auto"), kv_bytes_per_token=0)
