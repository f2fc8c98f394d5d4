"""The engine on a tiny random model: batching, KV accounting, stopping, bad requests."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.errors import ContextOverflowError, InvalidRequestError
from runtime.sampling import SamplingParams
from runtime.sequence import FinishReason, ImportedKV

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog and keeps running", "1 2 3", "Zürich"]


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine.from_artifact(
        tiny_artifact, RuntimeConfig(max_batch_size=4, max_step_tokens=24, block_size=4)
    )


def _solo(engine, ids, params):
    return [e.token_id for e in engine.generate(ids, params)]


def test_batched_requests_equal_their_solo_runs(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = [_solo(engine, ids, params) for ids in prompts]
    request_ids = [engine.add_request(ids, params) for ids in prompts]
    got = {r: [] for r in request_ids}
    while engine.has_work():
        for event in engine.step():
            got[event.request_id].append(event.token_id)
    assert [got[r] for r in request_ids] == expected
    assert engine.stats().kv_bytes_in_use == 0 and engine.allocator.num_sequences == 0


def test_requests_join_while_others_decode(engine):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    expected = [_solo(engine, ids, params) for ids in prompts]
    first = engine.add_request(prompts[0], params)
    got = {first: []}
    for step in range(40):
        if step in (3, 6):  # arrive mid-generation
            got[engine.add_request(prompts[len(got)], params)] = []
        for event in engine.step():
            got[event.request_id].append(event.token_id)
        if not engine.has_work() and len(got) == 3:
            break
    assert list(got.values()) == expected


def test_kv_is_freed_on_finish_abort_and_early_close(engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    request = engine.add_request(ids, params)
    engine.step()
    assert engine.stats().kv_bytes_in_use > 0
    assert engine.abort(request) and not engine.abort(request)
    assert engine.stats().kv_bytes_in_use == 0
    stream = engine.generate(ids, params)
    next(stream)
    assert engine.stats().kv_bytes_in_use > 0
    stream.close()  # the caller stopped listening
    assert engine.stats().kv_bytes_in_use == 0 and not engine.has_work()


def test_max_tokens_and_eos(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    events = list(engine.generate(ids, SamplingParams(max_tokens=5, ignore_eos=True)))
    assert len(events) == 5 and events[-1].finish_reason is FinishReason.LENGTH
    assert all(e.finish_reason is None for e in events[:-1])


def test_stop_string_ends_generation_and_is_not_emitted(engine):
    ids = engine.tokenizer.encode(PROMPTS[2])
    full = "".join(e.text for e in engine.generate(ids, SamplingParams(max_tokens=20, ignore_eos=True)))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("the random model's text has no usable stop string here")
    events = list(engine.generate(ids, SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,))))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason is FinishReason.STOP
    assert text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    assert _solo(engine, ids, params) == _solo(engine, ids, params)


def test_bad_requests_are_refused_and_leave_nothing_behind(engine):
    with pytest.raises(InvalidRequestError, match="prompt: empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request([10**7], SamplingParams())
    with pytest.raises(ContextOverflowError, match="exceeds the context of 256"):
        engine.add_request(list(range(250)), SamplingParams(max_tokens=10))
    assert not engine.has_work() and engine.stats().kv_bytes_in_use == 0


def test_long_prompt_is_prefilled_in_chunks(engine):
    ids = engine.tokenizer.encode(" ".join(["word"] * 60))  # longer than max_step_tokens=24
    solo = _solo(engine, ids, SamplingParams(max_tokens=4, ignore_eos=True))
    big = Engine.from_artifact(engine.artifact.path, RuntimeConfig(max_step_tokens=512), verify=False)
    assert solo == _solo(big, ids, SamplingParams(max_tokens=4, ignore_eos=True))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.95, seed=11)])
def test_kv_handoff_between_engines_continues_exactly(engine, tiny_artifact, sampling):
    """Prefill on one engine, export its KV, import it on another: same tokens as one engine alone."""
    params = SamplingParams(max_tokens=10, ignore_eos=True, **sampling)
    ids = engine.tokenizer.encode(PROMPTS[1])
    expected = _solo(engine, ids, params)
    prefill = Engine.from_artifact(tiny_artifact, RuntimeConfig(block_size=8), verify=False)
    first = list(prefill.generate_kept(ids, dataclasses.replace(params, max_tokens=1)))
    assert [e.token_id for e in first] == expected[:1]
    kv = prefill.export_kv(first[0].request_id)
    assert prefill.release_kv(first[0].request_id) and prefill.stats().kv_bytes_in_use == 0
    imported = ImportedKV(first[0].token_id, kv)
    request = engine.add_request(ids, params, imported=imported)
    got = []
    while engine.has_work():
        got += [e.token_id for e in engine.step() if e.request_id == request]
    assert got == expected and engine.stats().kv_bytes_in_use == 0


def test_kept_kv_is_freed_by_abort_and_checked_on_import(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    events = list(engine.generate_kept(ids, SamplingParams(max_tokens=1)))
    request = events[0].request_id
    assert engine.stats().kept_kv_sequences == 1 and engine.stats().kv_bytes_in_use > 0
    kv = engine.export_kv(request)
    assert engine.abort(request) and engine.stats().kv_bytes_in_use == 0
    with pytest.raises(InvalidRequestError, match="no kept KV"):
        engine.export_kv(request)
    with pytest.raises(InvalidRequestError, match="expected"):
        engine.add_request(ids + [5], SamplingParams(), imported=ImportedKV(1, kv))
