"""The services over real gRPC on loopback, each its own process (see conftest.py)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.edge.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.sampling import SamplingParams
from services.client import AsyncEdgeClient, EdgeClient

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "List three colors of the rainbow:",
    "Water boils at",
    "My favourite book is",
    "import numpy as np\nx =",
    "The quick brown fox",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def engine(smollm2_default):
    return Engine.from_artifact(smollm2_default, RuntimeConfig(num_threads=1))


def in_process(engine, prompt: str, max_tokens: int) -> list[int]:
    ids = engine.tokenizer.encode(prompt)
    return [e.token_id for e in engine.generate(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))]


def wait_kv_free(stack, name: str = "decode", timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = stack.decode_stats(name)
        if stats.kv_bytes_in_use == 0 and stats.active_sequences == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"KV still in use on {name}: {stack.decode_stats(name)}")


def test_greedy_tokens_equal_the_in_process_runtime(stack, engine):
    with EdgeClient(stack.addresses["gateway"], timeout=60) as client:
        for prompt in PROMPTS[:3]:
            got = client.complete(prompt, max_tokens=24, ignore_eos=True)
            assert got.token_ids == in_process(engine, prompt, 24)
            assert got.text == engine.tokenizer.decode(got.token_ids)
            assert got.finish_reason == "length" and got.completion_tokens == 24
        chat = client.complete("unused", max_tokens=8)  # plain generate with a short budget
        assert chat.completion_tokens <= 8


def test_disaggregated_prefill_gives_the_same_tokens(stack, engine):
    with EdgeClient(stack.addresses["gateway_disagg"], timeout=60) as client:
        for prompt in PROMPTS[:2]:
            assert client.complete(prompt, max_tokens=16, ignore_eos=True).token_ids == in_process(
                engine, prompt, 16
            )
        sampled = dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
        with EdgeClient(stack.addresses["gateway"], timeout=60) as colocated:
            assert (
                client.complete(PROMPTS[3], **sampled).token_ids
                == colocated.complete(PROMPTS[3], **sampled).token_ids
            )
    wait_kv_free(stack)


def test_chat_applies_the_template(stack, engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    expected = [e.token_id for e in engine.generate(ids, SamplingParams(max_tokens=20))]
    with EdgeClient(stack.addresses["gateway"], timeout=60) as client:
        got = [t for chunk in client.chat(messages, max_tokens=20) for t in chunk.token_ids]
    assert got == expected


def test_eight_concurrent_streams_equal_their_sequential_results(stack):
    lengths = [8, 30, 12, 25, 5, 40, 18, 22]

    async def run():
        async with AsyncEdgeClient(stack.addresses["gateway"], timeout=120) as client:
            sequential = [
                (await client.complete(p, max_tokens=n, ignore_eos=True)).token_ids
                for p, n in zip(PROMPTS, lengths)
            ]
            tasks = [client.complete(p, max_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, lengths)]
            concurrent = [c.token_ids for c in await asyncio.gather(*tasks)]
        return sequential, concurrent

    sequential, concurrent = asyncio.run(run())
    assert [len(c) for c in concurrent] == lengths
    assert concurrent == sequential
    wait_kv_free(stack)


def test_cancel_mid_stream_frees_the_kv(stack):
    with EdgeClient(stack.addresses["gateway"]) as client:
        stream = client.generate(PROMPTS[0], max_tokens=400, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 3:
                assert stack.decode_stats().kv_bytes_in_use > 0
                stream.cancel()
                break
    wait_kv_free(stack)


def test_deadline_stops_the_work_and_frees_the_kv(stack):
    with EdgeClient(stack.addresses["gateway"]) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.complete(PROMPTS[1], max_tokens=1000, ignore_eos=True, timeout=1.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_kv_free(stack)


def test_abort_by_request_id(stack):
    with EdgeClient(stack.addresses["gateway"]) as client:
        stream = client.generate(PROMPTS[2], max_tokens=400, ignore_eos=True, request_id="abort-me")
        next(stream)
        assert client.abort("abort-me")
        chunks = list(stream)  # the stream closes with an ABORT event, not silently
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_ABORT and chunks[-1].token_ids == []
    wait_kv_free(stack)


BAD_REQUESTS = [
    (dict(prompt=""), "prompt: empty"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=10**6), "max_tokens"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", top_k=-3), "top_k"),
    (dict(prompt="hi", stop=["x"] * 40), "stop"),
    (dict(prompt="hi", model="gpt-17"), "model"),
    (dict(prompt="word " * 8200, max_tokens=10), "context"),
    (dict(prompt="x" * 300_000), "bytes"),
    (dict(prompt=[10**7]), "vocabulary"),
]


@pytest.mark.parametrize("fields,needle", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_the_stack_stays_healthy(stack, fields, needle):
    fields = dict(fields)
    prompt = fields.pop("prompt")
    model = fields.pop("model", "")
    with EdgeClient(stack.addresses["gateway"], timeout=60) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.complete(prompt, model=model, **fields)
        expected = grpc.StatusCode.NOT_FOUND if needle == "model" else grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.code() == expected, error.value.details()
        assert needle in error.value.details()
        assert client.complete("Hello", max_tokens=2).completion_tokens == 2
    for name in ("gateway", "decode", "tokenizer"):
        with grpc.insecure_channel(stack.addresses[name]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_invalid_utf8_is_invalid_argument(stack):
    request = gateway_pb2.GenerateRequest(sampling={"max_tokens": 4})
    raw = request.SerializeToString() + b"\x1a\x02\xff\xfe"  # field 3 (prompt) with invalid UTF-8 bytes
    with grpc.insecure_channel(stack.addresses["gateway"]) as channel:
        call = channel.unary_stream(
            "/edge.v1.Gateway/Generate", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as error:
            list(call(raw, timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in error.value.details()


def test_list_models(stack):
    with grpc.insecure_channel(stack.addresses["gateway"]) as channel:
        models = (
            gateway_pb2_grpc.GatewayStub(channel)
            .ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
            .models
        )
    assert [(m.name, m.context_length, m.vocab_size) for m in models] == [("smollm2", 8192, 49152)]


def test_a_dead_replica_before_the_first_token_is_retried(stack):
    stack.kill("decode2")
    with EdgeClient(stack.addresses["gateway_replicas"], timeout=60) as client:
        for prompt in PROMPTS[:4]:  # round robin: half of these try the dead replica first
            assert client.complete(prompt, max_tokens=6, ignore_eos=True).completion_tokens == 6
    stack.start("decode2", "decode", stack.addresses["decode2"])


def test_decode_killed_mid_stream_is_a_clear_error_and_a_restart_recovers(stack):
    with EdgeClient(stack.addresses["gateway_replicas"], timeout=60) as client:
        stream = client.generate(PROMPTS[0], max_tokens=500, ignore_eos=True)
        first = next(stream)
        assert first.token_ids
        victim = next(n for n in ("decode2", "decode3") if stack.decode_stats(n).active_sequences)
        stack.kill(victim)
        with pytest.raises(grpc.RpcError) as error:
            list(stream)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the output is incomplete" in error.value.details()
        stack.start(victim, "decode", stack.addresses[victim])
        for prompt in PROMPTS[:2]:
            assert client.complete(prompt, max_tokens=4, ignore_eos=True).completion_tokens == 4


def test_sigterm_drains_in_flight_streams(stack):
    with EdgeClient(stack.addresses["gateway_replicas"], timeout=60) as client:
        stream = client.generate(PROMPTS[1], max_tokens=60, ignore_eos=True)
        next(stream)
        victim = next(n for n in ("decode2", "decode3") if stack.decode_stats(n).active_sequences)
        process = stack.processes[victim]
        threading.Timer(0.05, process.send_signal, (signal.SIGTERM,)).start()
        chunks = list(stream)  # the stream still completes: the drain lets it finish
        assert chunks[-1].usage.completion_tokens == 60
        assert process.wait(30) == 0
        stack.start(victim, "decode", stack.addresses[victim])
