"""The decode side of the KV handoff: pull a prefilled prompt's KV cache from a prefill node.

Chunks arrive per layer, one pool tensor after another (K then V, ...; SAQ's bottom-stair records, then
the slot's bytes in use), in the artifact's KV format and in the rows of
services.common.messages.kv_wire_rows; they are checked against the handle and this node's model
(Engine.kv_shapes) before anything is used.
"""

from __future__ import annotations

import grpc
import numpy as np

from protos.edge.v1 import prefill_pb2, prefill_pb2_grpc
from runtime.engine import Engine
from runtime.errors import InvalidRequestError, NotFoundError, UnavailableError
from runtime.sequence import ImportedKV
from services.common.messages import kv_wire_rows


class KvPuller:
    def __init__(self, max_message_bytes: int) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = [("grpc.max_receive_message_length", max_message_bytes)]

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return prefill_pb2_grpc.PrefillStub(self._channels[address])

    async def pull(self, handle, engine: Engine, prompt_len: int, timeout: float | None) -> ImportedKV:
        artifact = engine.artifact
        if handle.kv_format != artifact.kv_spec:
            raise InvalidRequestError(
                f"kv.kv_format: {handle.kv_format!r}, this node stores {artifact.kv_spec!r}"
            )
        if handle.num_tokens != prompt_len:
            raise InvalidRequestError(
                f"kv.num_tokens: {handle.num_tokens}, the prompt has {prompt_len} tokens"
            )
        shapes = engine.kv_shapes(prompt_len)  # per layer, the order PullKv sends `part`s in
        layers = [
            tuple(np.empty(shape, dtype) for shape, dtype in shapes) for _ in range(artifact.model.num_layers)
        ]
        wire = [tuple(kv_wire_rows(a, t.per) for a, t in zip(layer, engine.pool)) for layer in layers]
        expected = np.array([[len(rows) for rows in layer] for layer in wire])
        filled = np.zeros_like(expected)
        try:
            call = self._stub(handle.address).PullKv(
                prefill_pb2.PullKvRequest(session_id=handle.session_id), timeout=timeout
            )
            async for chunk in call:
                _place(chunk, wire, filled)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(
                    f"kv: session {handle.session_id} at {handle.address}: {e.details()}"
                ) from e
            raise UnavailableError(
                f"kv: pulling from {handle.address} failed: {e.code().name} {e.details()}"
            ) from e
        if not (filled == expected).all():
            raise UnavailableError(f"kv: the transfer from {handle.address} ended early")
        return ImportedKV(handle.first_token_id, layers)


def _place(chunk, layers, filled) -> None:
    if chunk.layer >= len(layers) or chunk.part >= len(layers[0]):
        raise InvalidRequestError(
            f"kv: chunk for layer {chunk.layer} part {chunk.part} does not fit the model"
        )
    target = layers[chunk.layer][chunk.part]
    start, count = chunk.token_start, chunk.token_count  # rows of kv_wire_rows
    data = np.frombuffer(chunk.data, dtype=target.dtype)
    if start + count > target.shape[0] or data.size != count * target.shape[1]:
        raise InvalidRequestError(f"kv: malformed chunk (layer {chunk.layer}, tokens {start}+{count})")
    target[start : start + count] = data.reshape(count, target.shape[1])
    filled[chunk.layer, chunk.part] += count
