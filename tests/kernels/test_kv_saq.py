"""The SAQ staircase KV cache (kernels/kv_saq.py): stairs, demotion, memory, attention, accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.kv_saq import SaqCache, SaqSchedule, _Stage, attend, dequantize_asym, quantize_asym

W, D = 128, 64  # two KV heads of 64


def _rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, W, generator=g) * torch.linspace(0.2, 4.0, W)  # channels of very different ranges
    return k, torch.randn(n, W, generator=g)


def test_parse_and_errors():
    s = SaqSchedule.parse("8:1,4:4,2", stage=32, sink=1, rotate="k")
    assert s.stairs == ((8, 1), (4, 4), (2, 0)) and s.text() == "8:1,4:4,2"
    assert [s.bits_at(a) for a in range(7)] == [8, 4, 4, 4, 4, 2, 2]
    assert s.bits_at(9, index=0) == 8  # the sink stage stays on the top stair
    with pytest.raises(ValueError, match="8, 4 or 2"):
        SaqSchedule.parse("8:1,3")
    with pytest.raises(ValueError, match="must not increase"):
        SaqSchedule.parse("4:1,8")
    with pytest.raises(ValueError, match="stage count"):
        SaqSchedule.parse("8,4:2,2")
    with pytest.raises(ValueError, match="BITS:STAGES"):
        SaqSchedule.parse("8:x,2")


def test_stairs_follow_age_as_the_context_grows():
    schedule = SaqSchedule.parse("8:1,4:2,2", stage=8, sink=1)
    cache = SaqCache(schedule, W)
    k, v = _rows(8 * 6 + 5)
    for start in range(0, k.shape[0], 3):  # odd appends: stages close mid-append
        cache.append(k[start : start + 3], v[start : start + 3])
    assert len(cache) == 53
    # oldest first: sink (8), then ages 4, 3 (2-bit), 2, 1 (4-bit), 0 (8-bit), then a 5-token residual
    assert [s.bits for s in cache.stages] == [8, 2, 2, 4, 4, 8]
    assert cache.bits_histogram() == {"int8": 16, "int2": 16, "int4": 16, "fp": 5}
    keys, values = cache.keys_values()
    assert keys.shape == values.shape == (53, W)
    assert torch.equal(keys[-5:], k[-5:].half().float())  # the residual is exact (fp16)


def test_demotion_requantizes_what_the_stage_holds():
    """A stage moving down a stair is re-quantized from its own dequantized codes, never from the
    full-precision rows (they are gone once the stage closes)."""
    k, v = (t.half() for t in _rows(16, seed=1))
    stage8 = _Stage(k, v, 8, 32)
    stage4 = stage8.demote(4)
    again = _Stage(stage8.keys(), stage8.values(), 4, 32)
    assert torch.equal(stage4.keys(), again.keys()) and torch.equal(stage4.values(), again.values())
    fresh = _Stage(k, v, 4, 32)
    assert not torch.equal(stage4.keys(), fresh.keys())  # compounding is real (and measured below)
    cache = SaqCache(SaqSchedule.parse("8:1,4", stage=16), W)
    cache.append(k, v)
    cache.append(*_rows(16, seed=2))  # closes a second stage: the first moves 8 -> 4
    assert cache.demotions == 1 and torch.equal(cache.stages[0].keys(), stage8.demote(4).keys())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_asymmetric_quantization_error_is_within_half_a_step(bits):
    x = _rows(64, seed=bits)[0]
    codes, lo, scale = quantize_asym(x, bits, dim=0)
    assert codes.max() <= (1 << bits) - 1
    error = (dequantize_asym(codes, lo, scale) - x).abs()
    assert (error <= scale.float() / 2 + 1e-3 * x.abs().amax(0)).all()


def test_memory_is_codes_and_scales():
    schedule = SaqSchedule.parse("8:1,4:4,2", stage=64, sink=1)
    cache = SaqCache(schedule, W)
    cache.append(*_rows(4096))
    hist = cache.bits_histogram()
    assert hist == {"int8": 128, "int4": 256, "int2": 3712, "fp": 0}
    codes = sum(n * W * int(b[3:]) // 8 for b, n in hist.items() if b != "fp")
    stages = 4096 // 64
    scales = stages * (2 * W * 2 + 64 * (W // 32) * 2 * 2)  # K: lo+scale per channel; V: per token per group
    assert cache.nbytes() == 2 * codes + scales
    fp16 = 4096 * W * 2 * 2
    assert fp16 / cache.nbytes() >= 5.0


def test_attention_over_the_staircase():
    """attend() equals dense causal attention over what the cache holds (plus the new rows in fp16)."""
    cache = SaqCache(SaqSchedule.parse("8:1,4:1,2", stage=8, rotate="k"), W, head_dim=D)
    k, v = _rows(40, seed=3)
    q = torch.randn(40, 4 * D)
    cache.append(k[:37], v[:37])
    out = attend(q[37:], k[37:], v[37:], cache, num_heads=4, num_kv_heads=2)
    keys, values = cache.keys_values()
    keys = torch.cat([keys, k[37:].half().float()])
    values = torch.cat([values, v[37:].half().float()])
    for h in range(4):
        kv = h // 2
        s = q[37:, h * D : (h + 1) * D] @ keys[:, kv * D : (kv + 1) * D].T / math.sqrt(D)
        s = s.masked_fill(torch.arange(40)[None] > torch.arange(37, 40)[:, None], float("-inf"))
        ref = s.softmax(-1) @ values[:, kv * D : (kv + 1) * D]
        torch.testing.assert_close(out[:, h * D : (h + 1) * D], ref, rtol=1e-5, atol=1e-5)


def test_rotation_is_undone():
    """Rotated stages come back in the original basis (within the quantization error of the unrotated
    format); the residual is never rotated. (On the embedded model the rotation is what makes 2-bit K
    usable: benchmarks/results/kv_accuracy.json.)"""
    k, v = _rows(64, seed=4)
    plain, rotated = (SaqCache(SaqSchedule.parse("4", stage=64, rotate=r), W, head_dim=D) for r in ("", "k"))
    for cache in (plain, rotated):
        cache.append(k, v)
    errors = [float((c.keys_values()[0] - k.half().float()).norm()) for c in (plain, rotated)]
    assert rotated.stages[0].bits == 4 and errors[1] <= 1.5 * errors[0]
    exact = SaqCache(SaqSchedule.parse("4", stage=1 << 10, rotate="k"), W, head_dim=D)
    exact.append(k, v)
    assert torch.equal(exact.keys_values()[0], k.half().float())  # residual: never rotated


def test_sink_tokens_stay_fp16_outside_stage_zero_ranges():
    """sink_tokens=2: the first two rows come back exact (fp16) after every close and demotion, are
    counted in nbytes, and stage 0 is quantized without them (an outlier there would stretch every
    channel's range: the stage's other rows come back closer than with the outlier inside)."""
    k, v = _rows(40, seed=5)
    k[0] *= 50  # an attention-sink-like outlier row
    plain = SaqCache(SaqSchedule.parse("8:1,2", stage=8), W)
    sink = SaqCache(SaqSchedule.parse("8:1,2", stage=8, sink_tokens=2), W)
    for cache in (plain, sink):
        cache.append(k, v)
    keys, values = sink.keys_values()
    assert torch.equal(keys[:2], k[:2].half().float()) and torch.equal(values[:2], v[:2].half().float())
    assert sink.stages[0].bits == 2  # demoted twice since it closed
    errors = [float((c.keys_values()[0][2:8] - k[2:8]).abs().max()) for c in (plain, sink)]
    assert errors[1] < errors[0] / 5, errors
    assert sink.nbytes() == plain.nbytes() + 2 * 2 * W * 2
    with pytest.raises(ValueError, match="sink_tokens"):
        SaqSchedule.parse("8:1,2", stage=8, sink_tokens=8)


@pytest.mark.slow
def test_embedded_model_accuracy_bar(reference_model, smollm2_fp32):
    """The served default staircase (SAQ_DEFAULT, an 8/4/2 one) on the embedded model: >= 5x less KV than
    fp16 for a 4096-token sequence, counted as the runtime allocates it (its slot, with the whole fp16
    open stage, and its bottom-stair blocks), and a guard on the dPPL vs an fp16 cache over the first 2048
    held-out tokens (the reference cache, same schedule and Hadamard rotation as the served graph). The
    issue's bar over >= 50k tokens is measured by benchmarks.kv_accuracy on a served artifact
    (benchmarks/results/kv_accuracy_saq_served.json: 0.299 at 5.001x). Measured here: 0.033."""
    import numpy as np

    from benchmarks.kv_accuracy import (
        EVAL_MODULES,
        log_softmax,
        reference_caches,
        reference_chunk_logits,
    )
    from exporters.calibration import stdlib_text
    from kernels.kv_formats import SAQ_DEFAULT, SaqFormat
    from runtime.artifact import load_artifact
    from runtime.tokenizer import Tokenizer

    cfg = reference_model.config
    width = cfg.num_kv_heads * cfg.head_dim
    fmt = SaqFormat.parse(SAQ_DEFAULT, width)
    held = fmt.slot_bytes + len(fmt.bottom_stages(4096)) * fmt.block_bytes
    assert 4096 * width * 2 * 2 / held >= 5.0
    schedule = SaqSchedule.parse(
        fmt.stairs_text, stage=fmt.stage, v_group=fmt.v_group, sink=fmt.sink, rotate="kv", clip=fmt.clip,
        sink_tokens=fmt.sink_tokens,
    )  # fmt: skip
    tokenizer = Tokenizer.from_file(load_artifact(smollm2_fp32, verify=False).tokenizer_file)
    ids = tokenizer.encode(stdlib_text(EVAL_MODULES), add_special_tokens=False)[:2048]
    nll = {}
    for name, plan in (("fp16", None), ("saq", schedule)):
        caches = reference_caches(reference_model, plan)
        losses, offset = [], 0
        for logits in reference_chunk_logits(reference_model, ids, caches, fmt.stage):
            targets = np.array(ids[offset + 1 : offset + 1 + len(logits)])
            losses += (-log_softmax(logits)[np.arange(len(targets)), targets]).tolist()
            offset += len(logits)
        nll[name] = float(np.exp(np.mean(losses)))
    assert nll["saq"] - nll["fp16"] <= 0.3, nll
