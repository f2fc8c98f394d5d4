"""Python client of the gateway, synchronous and asyncio.

    from services.client import EdgeClient
    with EdgeClient("127.0.0.1:50060") as client:
        for chunk in client.generate("The capital of France is", max_tokens=16):
            print(chunk.text, end="")
        print(client.complete("2 + 2 =", max_tokens=4).text)

    async with AsyncEdgeClient("127.0.0.1:50060") as client:
        async for chunk in client.chat([{"role": "user", "content": "Hi"}], max_tokens=32):
            ...

Errors are grpc.RpcError with the server's status code and a message that says what to change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from protos.edge.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2

FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass
class Completion:
    """A whole generation gathered from its stream."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, chunk: gateway_pb2.GenerateResponse) -> None:
        self.request_id = chunk.request_id
        self.text += chunk.text
        self.token_ids += list(chunk.token_ids)
        if chunk.finish_reason:
            self.finish_reason = FINISH_NAMES.get(chunk.finish_reason)
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens


def sampling(
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: tuple[str, ...] | list[str] = (),
    ignore_eos: bool = False,
) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        pb.seed = seed
    return pb


def generate_request(prompt: str | list[int], request_id: str = "", model: str = "", **settings):
    request = gateway_pb2.GenerateRequest(request_id=request_id, model=model, sampling=sampling(**settings))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def chat_request(messages: list[dict], request_id: str = "", model: str = "", **settings):
    pb_messages = [tokenizer_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return gateway_pb2.ChatRequest(
        request_id=request_id, model=model, messages=pb_messages, sampling=sampling(**settings)
    )


class EdgeClient:
    def __init__(self, address: str = "127.0.0.1:50060", *, timeout: float | None = None) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | list[int], *, timeout: float | None = None, **settings) -> Iterator:
        """Stream of GenerateResponse (text delta, token ids; finish_reason and usage on the last)."""
        return self._stub.Generate(generate_request(prompt, **settings), timeout=timeout or self.timeout)

    def chat(self, messages: list[dict], *, timeout: float | None = None, **settings) -> Iterator:
        return self._stub.Chat(chat_request(messages, **settings), timeout=timeout or self.timeout)

    def complete(self, prompt: str | list[int], **settings) -> Completion:
        completion = Completion()
        for chunk in self.generate(prompt, **settings):
            completion.add(chunk)
        return completion

    def abort(self, request_id: str) -> bool:
        return self._stub.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=self.timeout).found

    def list_models(self) -> list[gateway_pb2.Model]:
        return list(self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self.timeout).models)


class AsyncEdgeClient:
    def __init__(self, address: str = "127.0.0.1:50060", *, timeout: float | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncEdgeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate(self, prompt: str | list[int], *, timeout: float | None = None, **settings) -> AsyncIterator:
        return self._stub.Generate(generate_request(prompt, **settings), timeout=timeout or self.timeout)

    def chat(self, messages: list[dict], *, timeout: float | None = None, **settings) -> AsyncIterator:
        return self._stub.Chat(chat_request(messages, **settings), timeout=timeout or self.timeout)

    async def complete(self, prompt: str | list[int], **settings) -> Completion:
        completion = Completion()
        async for chunk in self.generate(prompt, **settings):
            completion.add(chunk)
        return completion

    async def abort(self, request_id: str) -> bool:
        reply = await self._stub.Abort(common_pb2.AbortRequest(request_id=request_id), timeout=self.timeout)
        return reply.found

    async def list_models(self) -> list[gateway_pb2.Model]:
        reply = await self._stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=self.timeout)
        return list(reply.models)
