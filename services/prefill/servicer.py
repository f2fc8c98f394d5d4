"""Prefill service: runs prompts, keeps their KV cache for one pull by a decode node.

Prefill(prompt)  -> first token + a KV session (kept until pulled, released, or its lease ends)
PullKv(session)  -> the KV in chunks of at most kv_chunk_bytes: per layer, each pool tensor (K then V, ...)
Release(session) -> frees it now
"""

from __future__ import annotations

import asyncio

from protos.edge.v1 import decode_pb2, prefill_pb2
from runtime.errors import NotFoundError, UnavailableError
from runtime.worker import EngineWorker
from services.common.config import PrefillConfig
from services.common.messages import event_to_pb, kv_wire_rows, sampling_from_pb


class PrefillServicer:
    def __init__(self, model_name: str, config: PrefillConfig) -> None:
        self._model = model_name
        self._config = config
        self._worker: EngineWorker | None = None
        self._leases: dict[str, asyncio.TimerHandle] = {}

    def attach(self, worker: EngineWorker) -> None:
        self._worker = worker

    @property
    def worker(self) -> EngineWorker:
        if self._worker is None:
            raise UnavailableError("prefill is loading its model; retry on another replica")
        return self._worker

    async def Prefill(self, request, context):
        worker = self.worker
        if request.model and request.model != self._model:
            raise NotFoundError(
                f"model: {request.model!r} is not served here; this node serves {self._model!r}"
            )
        params = sampling_from_pb(request.sampling)
        prompt = list(request.prompt_token_ids)
        event = await worker.prefill(prompt, params, request.request_id or None)
        session_id = event.request_id
        loop = asyncio.get_running_loop()
        self._leases[session_id] = loop.call_later(
            self._config.kv_lease_seconds, lambda: asyncio.ensure_future(self._expire(session_id))
        )
        engine = worker.engine
        handle = decode_pb2.KvHandle(
            session_id=session_id,
            num_tokens=len(prompt),
            first_token_id=event.token_id,
            kv_format=engine.artifact.kv_spec,
            model=self._model,
        )
        return prefill_pb2.PrefillResponse(kv=handle, first=event_to_pb(event, len(prompt)))

    async def PullKv(self, request, context):
        session_id = request.session_id
        if session_id not in self._leases:
            raise NotFoundError(
                f"session_id: {session_id!r} is unknown, already pulled, or its lease expired"
            )
        layers = await self.worker.call(lambda engine: engine.export_kv(session_id))
        pool = self.worker.engine.pool
        for index, arrays in enumerate(layers):
            for part, (tensor, array) in enumerate(zip(pool, arrays)):
                rows = kv_wire_rows(array, tensor.per)
                for chunk in _chunks(index, part, rows, self._config.kv_chunk_bytes):
                    yield chunk
        await self._release(session_id)  # pulled in full: free it now

    async def Release(self, request, context):
        return prefill_pb2.ReleaseResponse(found=await self._release(request.session_id))

    async def _release(self, session_id: str) -> bool:
        lease = self._leases.pop(session_id, None)
        if lease is None:
            return False
        lease.cancel()
        return await self.worker.call(lambda engine: engine.release_kv(session_id))

    async def _expire(self, session_id: str) -> None:
        await self._release(session_id)

    @property
    def kept_sessions(self) -> int:
        return len(self._leases)


def _chunks(layer: int, part: int, array, max_bytes: int):
    """[rows, width] (kv_wire_rows) in messages of at most max_bytes of data (one row at least)."""
    rows = max(1, max_bytes // array[0].nbytes) if len(array) else 1
    for start in range(0, len(array), rows):
        block = array[start : start + rows]
        yield prefill_pb2.KvChunk(
            layer=layer, part=part, token_start=start, token_count=len(block), data=block.tobytes()
        )
