"""Scheduler, KV block accounting, sampling and stop strings without a model."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.config import RuntimeConfig, config_from_dict, load_config
from runtime.errors import ConfigError, ContextOverflowError, InvalidRequestError, ResourceExhaustedError
from runtime.kv_cache import KVBlockAllocator, KVCacheLayout, layout_for_budget
from runtime.sampling import SamplingParams, sample
from runtime.scheduler import Scheduler
from runtime.sequence import FinishReason, Sequence


class _Tokenizer:
    """Token id i is the i-th character of a fixed alphabet (enough for Sequence)."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .!"
    eos_token_ids = [len(alphabet)]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))


def _seq(name, prompt_len, max_tokens=4, **kw):
    return Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, **kw), _Tokenizer())


def _scheduler(num_blocks=9, block_size=4, **kw):
    allocator = KVBlockAllocator(KVCacheLayout(num_blocks, block_size, bytes_per_token=10))
    args = dict(max_batch_size=4, max_step_tokens=8, max_queue=2) | kw
    return Scheduler(allocator, **args), allocator


def _run(scheduler, out):
    for row in out.rows:
        row.seq.num_computed = row.start + row.num_tokens
        if row.samples:
            row.seq.append(1)


def test_chunked_prefill_then_decode():
    scheduler, allocator = _scheduler()
    seq = _seq("a", prompt_len=13, max_tokens=2)
    scheduler.add(seq)
    chunks = []
    while seq.in_prefill:
        out = scheduler.schedule()
        assert out.is_prefill
        chunks.append(out.rows[0].num_tokens)
        _run(scheduler, out)
    assert chunks == [8, 5] and allocator.used_blocks == 4  # 13 + 2 tokens in blocks of 4
    out = scheduler.schedule()
    assert not out.is_prefill and out.rows[0].start == 13


def test_prefill_and_decode_alternate():
    scheduler, _ = _scheduler(num_blocks=40)
    first = _seq("a", prompt_len=3, max_tokens=20)
    scheduler.add(first)
    _run(scheduler, scheduler.schedule())
    scheduler.add(_seq("b", prompt_len=30, max_tokens=2))
    kinds = []
    for _ in range(6):
        out = scheduler.schedule()
        kinds.append(out.is_prefill)
        _run(scheduler, out)
    assert kinds == [False, True, False, True, False, True]  # "a" decodes between "b"'s prompt chunks


def test_waits_for_kv_then_runs_and_frees():
    scheduler, allocator = _scheduler(num_blocks=5)  # 4 usable blocks = 16 tokens
    a, b = _seq("a", 8, max_tokens=4), _seq("b", 8, max_tokens=4)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    assert [r.seq for r in out.rows] == [a] and list(scheduler.waiting) == [b]
    scheduler.finish(a)
    assert allocator.free_blocks == 4
    assert [r.seq for r in scheduler.schedule().rows] == [b]


def test_refusals():
    scheduler, _ = _scheduler(num_blocks=5)
    with pytest.raises(ContextOverflowError, match="holds 16"):
        scheduler.add(_seq("big", 15, max_tokens=4))
    scheduler.add(_seq("a", 8))
    scheduler.add(_seq("b", 8))
    with pytest.raises(ResourceExhaustedError, match="max_queue"):
        scheduler.add(_seq("c", 8))


def test_allocator_never_hands_out_the_scratch_block():
    allocator = KVBlockAllocator(layout_for_budget(10 * 4 * 8, block_size=4, bytes_per_token=8))
    tables = [allocator.allocate(str(i), 4) for i in range(10)]
    assert sorted(b for t in tables for b in t) == list(range(1, 11))
    with pytest.raises(ResourceExhaustedError):
        allocator.allocate("x", 1)
    allocator.free("3")
    allocator.free("3")
    assert allocator.free_blocks == 1 and allocator.allocate("y", 3) == tables[3]
    with pytest.raises(ResourceExhaustedError, match="raise kv_cache_bytes"):
        layout_for_budget(10, block_size=4, bytes_per_token=8)


def test_stop_strings_hold_back_partial_matches():
    tok = _Tokenizer()
    seq = Sequence("s", [0], SamplingParams(max_tokens=50, stop=("ded.",)), tok)
    deltas = [seq.append(tok.alphabet.index(c)).text for c in "we en ended. more"[:12]]
    assert "".join(deltas) == "we en en" and seq.finish_reason is FinishReason.STOP
    assert deltas[9:11] == ["", ""]  # "de" was held back while it could start the stop string
    seq = Sequence("s", [0], SamplingParams(max_tokens=4, stop=("xyz",)), tok)
    assert "".join(seq.append(tok.alphabet.index(c)).text for c in "abxy") == "abxy"  # released at the end
    assert seq.finish_reason is FinishReason.LENGTH


def test_eos_stops_unless_ignored():
    tok = _Tokenizer()
    seq = Sequence("s", [0], SamplingParams(max_tokens=5), tok)
    assert seq.append(tok.eos_token_ids[0]).finish_reason is FinishReason.STOP
    seq = Sequence("s", [0], SamplingParams(max_tokens=5, ignore_eos=True), tok)
    assert seq.append(tok.eos_token_ids[0]).finish_reason is None


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.1, 0.6, 0.3], np.float32))
    assert sample(logits, SamplingParams(), rng) == 1
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1), rng) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) == 1
    draws = [sample(logits, SamplingParams(temperature=1.0), rng) for _ in range(4000)]
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0.1, 0.6, 0.3], atol=0.03)
    top2 = {sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert top2 == {1, 2}
    penalized = sample(np.array([1.0, 1.1, 0.2]), SamplingParams(repetition_penalty=2.0), rng, np.array([1]))
    assert penalized == 0


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_tokens", 0),
        ("stop", ("",)),
    ],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'threads'"):
        config_from_dict({"threads": 2})
    with pytest.raises(ConfigError, match="block_size: expected int"):
        config_from_dict({"block_size": "16"})
    with pytest.raises(ConfigError, match="attention_kernel"):
        RuntimeConfig(attention_kernel="cuda")
    path = tmp_path / "node.yaml"
    path.write_text("runtime:\n  num_threads: 1\n  max_batch_size: 2\n")
    assert load_config(path) == RuntimeConfig(num_threads=1, max_batch_size=2)
