"""Gateway: what apps call. Validates, tokenizes, then streams from a decode replica.

    Generate/Chat -> check the request -> tokenizer (Encode / ApplyChatTemplate)
                  -> [prefill replica: first token + KV handle]      (when the split policy says so)
                  -> decode replica: stream tokens back as text deltas
                  -> on UNAVAILABLE before any token: the next replica; after tokens: a clear error

Deadlines travel down with every call; a client that cancels cancels the downstream calls, which
frees the KV at once. Every upstream channel uses gRPC's round_robin: an address that is a DNS name
resolving to several replicas (`dns:///decode:50063`, a compose service scaled up, a Swarm service with
endpoint_mode dnsrr) spreads requests over all of them; such a name is tried twice, so a request that
met a replica going away lands on another one. A prefill address must name one instance: the decode
node pulls the KV back from the address the prefill call went to.
"""

from __future__ import annotations

import itertools
import logging
import uuid

import grpc

from protos.edge.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    prefill_pb2,
    prefill_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from runtime.errors import InvalidRequestError, NotFoundError, UnavailableError
from services.common.config import GatewayConfig
from services.common.errors import UpstreamError
from services.common.messages import sampling_from_pb
from services.common.server import request_id_var
from services.gateway.split_policy import SplitPolicy

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class Replicas:
    """Stubs for one kind of upstream service, tried in round-robin order."""

    def __init__(self, addresses: tuple[str, ...], stub_class, options) -> None:
        self.addresses = list(addresses)
        options = [*options, ("grpc.lb_policy_name", "round_robin")]
        self._channels = [grpc.aio.insecure_channel(a, options=options) for a in addresses]
        self._stubs = [stub_class(c) for c in self._channels]
        self._next = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._stubs)

    def in_order(self):
        """(address, stub) pairs, starting at the next replica in turn; DNS names come round twice."""
        start = next(self._next) % len(self._stubs)
        order = list(range(start, len(self._stubs))) + list(range(start))
        order += [i for i in order if self.addresses[i].startswith("dns:")]
        return [(self.addresses[i], self._stubs[i]) for i in order]


class GatewayServicer:
    def __init__(self, config: GatewayConfig, model_name: str, split: SplitPolicy | None = None) -> None:
        self._config = config
        self._model = model_name
        self._split = split or SplitPolicy.from_config(config, kv_bytes_per_token=0)
        options = [("grpc.max_receive_message_length", config.max_message_bytes)]
        self._tokenizer = Replicas((config.tokenizer,), tokenizer_pb2_grpc.TokenizerStub, options)
        self._decode = Replicas(config.decode, decode_pb2_grpc.DecodeStub, options)
        self._prefill = Replicas(config.prefill, prefill_pb2_grpc.PrefillStub, options)
        self._active: dict[str, tuple[str, decode_pb2_grpc.DecodeStub]] = {}  # request id -> decode replica

    # -- RPCs ---------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        _adopt_request_id(request)
        self._check_model(request.model)
        self._check_sampling(request.sampling)
        if request.WhichOneof("input") == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            ids = await self._encode(request.prompt, context)
        async for response in self._generate(request.request_id, ids, request.sampling, context):
            yield response

    async def Chat(self, request, context):
        _adopt_request_id(request)
        self._check_model(request.model)
        self._check_sampling(request.sampling)
        if not request.messages:
            raise InvalidRequestError("messages: empty; send at least one message")
        size = sum(len(m.content.encode()) for m in request.messages)
        self._check_prompt_size(size, "messages")
        template = tokenizer_pb2.ChatTemplateRequest(messages=request.messages, add_generation_prompt=True)
        reply = await self._call(self._tokenizer, "ApplyChatTemplate", template, context)
        async for response in self._generate(
            request.request_id, list(reply.token_ids), request.sampling, context
        ):
            yield response

    async def Abort(self, request, context):
        entry = self._active.get(request.request_id)
        if entry is None:
            return common_pb2.AbortResponse(found=False)
        _, stub = entry
        return await stub.Abort(common_pb2.AbortRequest(request_id=request.request_id), timeout=5)

    async def ListModels(self, request, context):
        stats = await self._call(self._decode, "Stats", decode_pb2.StatsRequest(), context)
        model = gateway_pb2.Model(
            name=self._model,
            context_length=stats.context_length,
            vocab_size=stats.vocab_size,
            kv_format=stats.kv_format,
        )
        return gateway_pb2.ModelList(models=[model])

    # -- checks -------------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name and name != self._model:
            raise NotFoundError(f"model: {name!r} is not served here; ListModels shows {self._model!r}")

    def _check_sampling(self, sampling) -> None:
        params = sampling_from_pb(sampling)  # raises naming the bad field
        if params.max_tokens > self._config.max_tokens_limit:
            raise InvalidRequestError(
                f"sampling.max_tokens: {params.max_tokens} is more than this gateway allows "
                f"({self._config.max_tokens_limit}); ask for fewer tokens"
            )
        if len(params.stop) > self._config.max_stop_strings:
            raise InvalidRequestError(f"sampling.stop: at most {self._config.max_stop_strings} stop strings")

    def _check_prompt_size(self, size: int, field: str) -> None:
        if size > self._config.max_prompt_bytes:
            raise InvalidRequestError(
                f"{field}: {size} bytes, this gateway accepts at most "
                f"{self._config.max_prompt_bytes}; shorten it"
            )

    async def _encode(self, prompt: str, context) -> list[int]:
        if not prompt:
            raise InvalidRequestError("prompt: empty; send the text to continue")
        self._check_prompt_size(len(prompt.encode("utf-8", "surrogatepass")), "prompt")
        reply = await self._call(
            self._tokenizer,
            "Encode",
            tokenizer_pb2.EncodeRequest(text=prompt, add_special_tokens=True),
            context,
        )
        return list(reply.token_ids)

    # -- upstream calls -----------------------------------------------------------------------------

    async def _call(self, replicas: Replicas, method: str, message, context):
        """A unary call on the first replica that is available, within the caller's deadline."""
        last = None
        for address, stub in replicas.in_order():
            try:
                return await getattr(stub, method)(
                    message, timeout=context.time_remaining(), metadata=_metadata()
                )
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise UpstreamError(e.code(), e.details()) from e
                last = f"{address}: {e.details()}"
        raise UnavailableError(f"no {method} replica is available ({last})")

    async def _generate(self, request_id: str, ids: list[int], sampling, context):
        if not ids:
            raise InvalidRequestError("prompt: encodes to no tokens; send some text")
        kv = None
        if self._prefill and self._split.should_split(len(ids)):
            kv, first = await self._run_prefill(request_id, ids, sampling, context)
            if first.finish_reason == common_pb2.FINISH_REASON_STOP or sampling.max_tokens == 1:
                await self._release(kv)  # the first token ended it: nothing to decode
                yield _response(request_id, first)
                return
        decode_request = decode_pb2.DecodeRequest(
            request_id=request_id, model=self._model, prompt_token_ids=ids, sampling=sampling, kv=kv
        )
        async for response in self._stream_decode(request_id, decode_request, context):
            yield response

    async def _run_prefill(self, request_id, ids, sampling, context):
        request = prefill_pb2.PrefillRequest(
            request_id=request_id, model=self._model, prompt_token_ids=ids, sampling=sampling
        )
        last = None
        for address, stub in self._prefill.in_order():
            try:
                reply = await stub.Prefill(request, timeout=context.time_remaining(), metadata=_metadata())
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise UpstreamError(e.code(), e.details()) from e
                last = f"{address}: {e.details()}"
                continue
            reply.kv.address = address
            return reply.kv, reply.first
        raise UnavailableError(f"no prefill replica is available ({last})")

    async def _release(self, kv) -> None:
        for address, stub in self._prefill.in_order():
            if address == kv.address:
                try:
                    await stub.Release(prefill_pb2.ReleaseRequest(session_id=kv.session_id), timeout=5)
                except grpc.aio.AioRpcError:
                    pass  # its lease frees it anyway
                return

    async def _stream_decode(self, request_id: str, request, context):
        """Stream from the first decode replica that takes the request; never cut a stream silently."""
        last = None
        for address, stub in self._decode.in_order():
            streamed = 0
            call = stub.Generate(request, timeout=context.time_remaining(), metadata=_metadata())
            self._active[request_id] = (address, stub)
            try:
                async for event in call:
                    streamed += 1
                    yield _response(request_id, event)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() in RETRYABLE and streamed == 0:
                    log.warning(
                        "decode replica unavailable, trying the next", extra={"fields": {"replica": address}}
                    )
                    last = f"{address}: {e.details()}"
                    continue
                if streamed:
                    raise UnavailableError(
                        f"decode replica {address} failed after {streamed} tokens "
                        f"({e.code().name}: {e.details()}); "
                        "the output is incomplete, retry the request"
                    ) from e
                raise UpstreamError(e.code(), e.details()) from e
            finally:
                call.cancel()  # no-op when done; stops the replica's work when the client went away
                self._active.pop(request_id, None)
        raise UnavailableError(f"no decode replica is available ({last})")


def _adopt_request_id(request) -> None:
    """The request's id (or a new one) is the id of every log line and upstream call for it."""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    request_id_var.set(request.request_id)


def _metadata() -> tuple:
    return (("x-request-id", request_id_var.get()),)


def _response(request_id: str, event) -> gateway_pb2.GenerateResponse:
    response = gateway_pb2.GenerateResponse(
        request_id=request_id,
        text=event.text,
        token_ids=[event.token_id] if event.HasField("token_id") else [],
        finish_reason=event.finish_reason,
    )
    if event.HasField("usage"):
        response.usage.CopyFrom(event.usage)
    return response
