"""The gateway's split policy: a cost model with no gRPC and no tensors (services/gateway/split_policy.py)."""

from __future__ import annotations

import pytest

from kernels.kv_formats import SaqFormat
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


# a staircase of 128-token stages over SmolLM2-135M's KV width
SMOLLM2_SAQ = SaqFormat.parse("8:1,4:7,2;stage=128;v_group=64;sink=1;clip=2", 3 * 64)


def saq_handoff_bytes(n: int) -> int:
    return 30 * SMOLLM2_SAQ.handoff_bytes(n)  # what an SAQ handoff moves (Artifact.kv_handoff_bytes)


def test_a_non_linear_kv_cost_is_searched():
    """SAQ's handoff is not linear in n (the open stage travels in fp16, closed stages as records that
    shrink as they age): on a slow link the split prompts are not one range, and the break-even is the
    shortest one that splits, found by search."""
    p = policy(kv_bytes_per_token=0, kv_handoff_bytes=saq_handoff_bytes, link_bandwidth_mbps=100.0,
               max_prompt_tokens=2048)  # fmt: skip
    assert p.estimate(200).kv_bytes == saq_handoff_bytes(200) == 30 * (2 * 2 * 72 * 192 + 51456)
    splits = [n for n in range(1, 2049) if p.should_split(n)]
    n = p.break_even_tokens()
    assert n == splits[0] and 128 < n < 2048
    assert any(not p.should_split(m) for m in range(n, 2049))  # an open stage nearly full costs more
    linear = policy(kv_bytes_per_token=-(-30 * SMOLLM2_SAQ.block_bytes // 128), link_bandwidth_mbps=100.0)
    assert linear.break_even_tokens() < n  # the old per-token figure left the slot out
    assert policy(kv_bytes_per_token=0, kv_handoff_bytes=saq_handoff_bytes, local_prefill_tokens_per_s=800.0
                  ).break_even_tokens() is None  # fmt: skip
    slow = policy(kv_bytes_per_token=0, kv_handoff_bytes=saq_handoff_bytes, link_bandwidth_mbps=5.0,
                  max_prompt_tokens=1024)  # fmt: skip
    assert slow.break_even_tokens() is None and not any(slow.should_split(m) for m in (1, 100, 1000))


def test_from_config_prefers_the_configured_linear_cost():
    auto = GatewayConfig(split_policy="auto")
    p = SplitPolicy.from_config(auto, kv_handoff_bytes=saq_handoff_bytes)
    assert p.kv_bytes_per_token == 0 and p.estimate(1000).kv_bytes == saq_handoff_bytes(1000)
    manual = SplitPolicy.from_config(
        GatewayConfig(split_policy="auto", kv_bytes_per_token=FP16_KV), kv_handoff_bytes=saq_handoff_bytes
    )
    assert manual.kv_handoff_bytes is None and manual.estimate(1000).kv_bytes == 1000 * FP16_KV
    assert SplitPolicy.from_config(auto, FP16_KV).estimate(10).kv_bytes == 10 * FP16_KV
