"""Decode service: protobuf in, protobuf out. Every decision lives in runtime.EngineWorker/Engine.

A request with a `kv` handle was prefilled on a prefill node: its KV cache is pulled from there
(kv_transfer.pull_kv) before it joins the batch.
"""

from __future__ import annotations

from protos.edge.v1 import common_pb2, decode_pb2
from runtime.errors import NotFoundError, UnavailableError
from runtime.worker import EngineWorker
from services.common.messages import event_to_pb, sampling_from_pb
from services.decode.kv_transfer import KvPuller


class DecodeServicer:
    def __init__(self, model_name: str) -> None:
        self._model = model_name
        self._worker: EngineWorker | None = None
        self._puller: KvPuller | None = None
        self.draining = False

    def attach(self, worker: EngineWorker, puller: KvPuller) -> None:
        self._worker, self._puller = worker, puller

    @property
    def worker(self) -> EngineWorker:
        if self._worker is None or self.draining:
            raise UnavailableError("decode is loading its model or draining; retry on another replica")
        return self._worker

    def _check_model(self, name: str) -> None:
        if name and name != self._model:
            raise NotFoundError(f"model: {name!r} is not served here; this node serves {self._model!r}")

    async def Generate(self, request, context):
        worker = self.worker
        self._check_model(request.model)
        params = sampling_from_pb(request.sampling)
        prompt = list(request.prompt_token_ids)
        imported = None
        if request.HasField("kv"):
            imported = await self._puller.pull(
                request.kv, worker.engine, len(prompt), context.time_remaining()
            )
        async for event in worker.generate(prompt, params, request.request_id or None, imported=imported):
            yield event_to_pb(event, len(prompt))

    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=await self.worker.abort(request.request_id))

    async def Stats(self, request, context):
        worker = self.worker
        stats = await worker.call(lambda engine: engine.stats())
        engine = worker.engine
        return decode_pb2.DecodeStats(
            active_sequences=stats.active_sequences,
            waiting_sequences=stats.waiting_sequences,
            kv_bytes_in_use=stats.kv_bytes_in_use,
            kv_bytes_free=stats.kv_bytes_free,
            steps_per_second=worker.steps_per_second(),
            steps=stats.steps,
            attention_kernel=engine.backend.attention_kernel,
            model=self._model,
            context_length=engine.max_seq_len,
            vocab_size=engine.artifact.model.vocab_size,
            kv_format=engine.artifact.kv_format,
            kept_kv_sequences=stats.kept_kv_sequences,
            kv_bytes_per_token=engine.artifact.kv_bytes_per_token,
            kv_bytes_in_use_by_format={engine.artifact.kv_format: stats.kv_bytes_in_use},
            kv_tokens_capacity=engine.allocator.capacity_tokens,
        )
