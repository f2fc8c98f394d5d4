"""The engine: schedule -> run -> sample -> update, one step at a time.

    engine = Engine.from_artifact("artifacts/smollm2-135m-instruct", RuntimeConfig())
    for event in engine.generate(engine.tokenizer.encode("Hello"), SamplingParams(max_tokens=16)):
        print(event.text, end="")

`add_request` queues a request, `step` advances every active request by one scheduled step and
returns the token events it produced, `abort` stops a request and frees its KV at once. `generate`
drives `step` for one request. The engine is single-threaded: a service calls it from one worker
thread and hands events to its callers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from runtime.artifact import Artifact, load_artifact
from runtime.backends.onnxruntime import OrtBackend, StepBatch
from runtime.config import RuntimeConfig
from runtime.errors import ContextOverflowError, InvalidRequestError
from runtime.kv_cache import SCRATCH_BLOCK, KVBlockAllocator, layout_for_budget
from runtime.sampling import SamplingParams, sample
from runtime.scheduler import Scheduler, SchedulerOutput
from runtime.sequence import FinishReason, Sequence, TokenEvent
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DEFAULT_KV_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineStats:
    active_sequences: int
    waiting_sequences: int
    kv_bytes_in_use: int
    kv_bytes_free: int
    steps: int


class Engine:
    def __init__(self, artifact: Artifact, config: RuntimeConfig) -> None:
        self.artifact = artifact
        self.config = config
        info = artifact.tokenizer_info
        self.tokenizer = Tokenizer.from_file(
            artifact.tokenizer_file,
            chat_template=info.get("chat_template"),
            bos_token_id=info.get("bos_token_id"),
            eos_token_ids=info.get("eos_token_ids") or (),
        )
        context = artifact.model.max_position_embeddings
        self.max_seq_len = min(config.max_seq_len or context, context)
        budget = config.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        layout = layout_for_budget(budget, config.block_size, artifact.kv_bytes_per_token)
        self.allocator = KVBlockAllocator(layout)
        self.scheduler = Scheduler(
            self.allocator,
            max_batch_size=config.max_batch_size,
            max_step_tokens=config.max_step_tokens,
            max_queue=config.max_queue,
        )
        self.backend = OrtBackend(artifact, config, layout)
        self._sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._steps = 0

    @classmethod
    def from_artifact(cls, path, config: RuntimeConfig | None = None, *, verify: bool = True) -> Engine:
        return cls(load_artifact(path, verify=verify), config or RuntimeConfig())

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queue a request; bad input raises InvalidRequestError naming the field."""
        self._check_prompt(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._sequences:
            raise InvalidRequestError(f"request_id: {request_id!r} is already active; use a unique id")
        seq = Sequence(request_id, prompt_ids, params, self.tokenizer)
        self.scheduler.add(seq)
        self._sequences[request_id] = seq
        return request_id

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) == 0:
            raise InvalidRequestError("prompt: empty; give at least one token")
        vocab = self.artifact.model.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_seq_len:
            raise ContextOverflowError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"context of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV now; False if it is not active."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        seq.abort()
        self.scheduler.finish(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            active_sequences=len(self.scheduler.running),
            waiting_sequences=len(self.scheduler.waiting),
            kv_bytes_in_use=self.allocator.bytes_in_use,
            kv_bytes_free=self.allocator.bytes_free,
            steps=self._steps,
        )

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """schedule -> run -> sample -> update; returns the events of this step."""
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return []
        logits = self.backend.run(self._batch(scheduled))
        self._steps += 1
        events = []
        for row, row_logits in zip(scheduled.rows, logits):
            seq = row.seq
            seq.num_computed = row.start + row.num_tokens
            if not row.samples:
                continue
            token = sample(row_logits[-1], seq.params, seq.rng, seq.all_ids)
            event = seq.append(token)
            events.append(event)
            if seq.finished:
                self.scheduler.finish(seq)
                self._sequences.pop(seq.request_id, None)
        return events

    def _batch(self, scheduled: SchedulerOutput) -> StepBatch:
        """Right-padded [B, S] inputs for the scheduled rows; padding writes to the scratch block."""
        rows = scheduled.rows
        B, S = len(rows), max(r.num_tokens for r in rows)
        block_size = self.allocator.layout.block_size
        max_blocks = max(len(r.seq.block_table) for r in rows)
        input_ids = np.zeros((B, S), np.int64)
        positions = np.zeros((B, S), np.int64)
        slots = np.full((B, S), SCRATCH_BLOCK * block_size, np.int64)
        tables = np.full((B, max_blocks), SCRATCH_BLOCK, np.int32)
        for b, row in enumerate(rows):
            n, table = row.num_tokens, np.asarray(row.seq.block_table, np.int32)
            pos = np.arange(row.start, row.start + n)
            input_ids[b, :n] = row.seq.all_ids[row.start : row.start + n]
            positions[b, :n] = pos
            slots[b, :n] = table[pos // block_size].astype(np.int64) * block_size + pos % block_size
            tables[b, : len(table)] = table
        starts = np.array([r.start for r in rows], np.int32)
        counts = np.array([r.num_tokens for r in rows], np.int32)
        return StepBatch(
            input_ids=input_ids,
            position_ids=positions,
            slot_mapping=slots,
            block_table=tables,
            past_lens=starts,
            total_lens=starts + counts,
            logit_positions=(counts - 1).astype(np.int64)[:, None],
        )

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Run one request to the end, yielding its events as they come (other requests advance too)."""
        request_id = self.add_request(prompt_ids, params)
        try:
            while True:
                events = self.step()
                if not events and not self.has_work():
                    raise RuntimeError(f"request {request_id} left the engine without finishing")
                for event in events:
                    if event.request_id == request_id:
                        yield event
                        if event.finish_reason is not None:
                            return
        finally:
            self.abort(request_id)  # a caller that stops iterating frees the KV at once


__all__ = ["Engine", "EngineStats", "FinishReason", "RuntimeConfig", "SamplingParams", "TokenEvent"]
