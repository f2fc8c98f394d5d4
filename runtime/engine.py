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
from runtime.kv_cache import SCRATCH_BLOCK, KVBlockAllocator, layout_for_pool, num_slots_for
from runtime.sampling import SamplingParams, sample
from runtime.scheduler import Scheduler, SchedulerOutput
from runtime.sequence import FinishReason, ImportedKV, Sequence, TokenEvent
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DEFAULT_KV_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineStats:
    active_sequences: int
    waiting_sequences: int
    kept_kv_sequences: int
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
        block_size = artifact.block_size or config.block_size
        if block_size != config.block_size:
            log.info(
                "KV format %s fixes blocks of %d tokens (one stage); block_size %d of the config is not used",
                artifact.kv_spec, block_size, config.block_size,
            )  # fmt: skip
        self.pool = artifact.pool_tensors()  # one layer's KV tensors: what export/import move, by `per`
        num_slots = num_slots_for(self.pool, config.max_batch_size)
        layout = layout_for_pool(budget, block_size, self.pool, artifact.model.num_layers, num_slots)
        paged = artifact.saq.bottom_stages if artifact.saq is not None else None  # SAQ: stages in blocks
        self.allocator = KVBlockAllocator(layout, paged)
        self.scheduler = Scheduler(
            self.allocator,
            max_batch_size=config.max_batch_size,
            max_step_tokens=config.max_step_tokens,
            max_queue=config.max_queue,
        )
        if config.backend == "torch":
            from runtime.backends.torch_cuda import TorchBackend  # torch is imported only when chosen

            self.backend = TorchBackend(artifact, config, layout)
        else:
            self.backend = OrtBackend(artifact, config, layout)
        self._sequences: dict[str, Sequence] = {}
        self._parked: dict[str, Sequence] = {}  # finished with keep_kv: blocks held for export_kv
        self._ids = itertools.count()
        self._steps = 0

    @classmethod
    def from_artifact(cls, path, config: RuntimeConfig | None = None, *, verify: bool = True) -> Engine:
        return cls(load_artifact(path, verify=verify), config or RuntimeConfig())

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        keep_kv: bool = False,
        imported: ImportedKV | None = None,
    ) -> str:
        """Queue a request; bad input raises InvalidRequestError naming the field.

        keep_kv: when it finishes, the sequence keeps its KV blocks for `export_kv` until
        `release_kv` (the prefill side of a handoff). imported: the prompt's KV cache computed
        elsewhere and the first token sampled there (the decode side).
        """
        self._check_prompt(prompt_ids, params)
        if imported is not None:
            self._check_imported(imported, len(prompt_ids))
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._sequences or request_id in self._parked:
            raise InvalidRequestError(f"request_id: {request_id!r} is already active; use a unique id")
        seq = Sequence(request_id, prompt_ids, params, self.tokenizer, keep_kv=keep_kv, imported=imported)
        self.scheduler.add(seq)
        self._sequences[request_id] = seq
        return request_id

    def kv_shapes(self, prompt_len: int) -> list[tuple[tuple[int, int], np.dtype]]:
        """Shape and dtype of each array of one layer of a `prompt_len`-token prompt's exported KV: per
        token [prompt_len, width]; per block [its paged stages, width]; per slot [1, the slot's bytes in
        use] (see _prompt_index)."""
        rows = {"token": prompt_len, "block": len(self.allocator.paged_blocks(prompt_len)), "slot": 1}
        slot_width = len(self._slot_bytes(prompt_len))
        widths = [slot_width if t.per == "slot" else t.width for t in self.pool]
        return [((rows[t.per], width), np.dtype(t.dtype)) for t, width in zip(self.pool, widths)]

    def _check_imported(self, imported: ImportedKV, prompt_len: int) -> None:
        model = self.artifact.model
        expected = self.kv_shapes(prompt_len)
        if len(imported.layers) != model.num_layers:
            raise InvalidRequestError(f"kv: {len(imported.layers)} layers, the model has {model.num_layers}")
        for i, arrays in enumerate(imported.layers):
            if [(a.shape, a.dtype) for a in arrays] != expected:
                got = [f"{a.shape} {a.dtype}" for a in arrays]
                want = [f"{shape} {dtype}" for shape, dtype in expected]
                raise InvalidRequestError(
                    f"kv: layer {i} holds {got}, expected {want} ({self.artifact.kv_spec}) for a "
                    f"{prompt_len}-token prompt"
                )
        if not 0 <= imported.first_token_id < model.vocab_size:
            raise InvalidRequestError(
                f"kv: first token id {imported.first_token_id} is outside the vocabulary"
            )

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

    def abort(self, request_id: str) -> TokenEvent | None:
        """Stop a request and free its KV now (kept KV too). Returns the event that closes its
        stream, or None if it was not active."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            released = self.release_kv(request_id)
            return TokenEvent(request_id, None, "", 0, FinishReason.ABORT) if released else None
        event = seq.abort()
        self.scheduler.finish(seq)
        return event

    def export_kv(self, request_id: str) -> list[tuple[np.ndarray, ...]]:
        """A kept sequence's prompt KV in the artifact's KV format: per layer, what holds the prompt in each
        pool tensor (kv_shapes, _prompt_index): [prompt_len, width] per token (K and V; codes then scales
        for a quantized format); SAQ: the records of the prompt's bottom-stair stages, and the bytes in use
        of its slot as one row."""
        seq = self._parked.get(request_id)
        if seq is None:
            raise InvalidRequestError(
                f"kv: no kept KV cache for request {request_id!r} (released or expired)"
            )
        if seq.num_computed != seq.prompt_len and any(t.per != "token" for t in self.pool):
            raise InvalidRequestError(
                f"kv: request {request_id!r} went past its prompt; a {self.artifact.kv_format} cache holds "
                "the prompt alone only right after it (keep it with max_tokens 1, as a prefill node does)"
            )
        index = self._prompt_index(seq)
        pools = self._layer_pools()
        return [tuple(flat[index[t.per]] for t, flat in zip(self.pool, layer)) for layer in pools]

    def release_kv(self, request_id: str) -> bool:
        """Free a kept KV cache; False if there is none."""
        seq = self._parked.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        return True

    def _layer_pools(self) -> list[list[np.ndarray]]:
        """The backend's pool arrays grouped per layer (self.pool each), as rows [-1, width]."""
        pools = [t.reshape(-1, t.shape[-1]) for t in self.backend.cache_arrays()]
        n = len(self.pool)
        return [pools[i : i + n] for i in range(0, len(pools), n)]

    def _prompt_index(self, seq: Sequence) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """Where the sequence's prompt lives in each kind of pool tensor, as an index of its rows [-1, width]
        (export_kv reads it, _import writes it): per token, the flat rows (block * block_size + offset) of
        its tokens; per block, the blocks of its paged stages (SAQ: on the bottom stair); per slot, the
        bytes of its slot's row in use (SAQ: SaqFormat.slot_ranges; the others are not read before they
        are written, so they neither travel nor need to be cleared)."""
        block_size = self.allocator.layout.block_size
        positions = np.arange(seq.prompt_len)
        table = np.asarray(seq.block_table, np.int64)
        paged = np.asarray(self.allocator.paged_blocks(seq.prompt_len), np.int64)
        return {
            "token": table[positions // block_size] * block_size + positions % block_size,
            "block": table[paged],
            "slot": np.ix_([seq.slot], self._slot_bytes(seq.prompt_len)),
        }

    def _slot_bytes(self, num_tokens: int) -> np.ndarray:
        """Byte columns of a slot's row in use once `num_tokens` tokens are cached (SAQ, the one format with
        slots)."""
        ranges = self.artifact.saq.slot_ranges(num_tokens) if self.artifact.saq is not None else []
        columns = [np.arange(offset, offset + size) for offset, size in ranges]
        return np.concatenate(columns) if columns else np.zeros(0, np.int64)

    def _import(self, seq: Sequence) -> TokenEvent:
        """Write an admitted sequence's imported KV into its blocks and slot; emit the token sampled
        upstream."""
        index = self._prompt_index(seq)
        for pool, arrays in zip(self._layer_pools(), seq.imported.layers):
            for tensor, flat, array in zip(self.pool, pool, arrays):
                flat[index[tensor.per]] = array
        first = seq.imported.first_token_id
        seq.imported = None
        return seq.append(first)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            active_sequences=len(self.scheduler.running),
            waiting_sequences=len(self.scheduler.waiting),
            kv_bytes_in_use=self.allocator.bytes_in_use,
            kept_kv_sequences=len(self._parked),
            kv_bytes_free=self.allocator.bytes_free,
            steps=self._steps,
        )

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """schedule -> run -> sample -> update; returns the events of this step."""
        events = [self._import(seq) for seq in self.scheduler.admit_imported()]
        for event in events:
            self._after_token(self._sequences[event.request_id])
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return events
        logits = self.backend.run(self._batch(scheduled))
        self._steps += 1
        for row, row_logits in zip(scheduled.rows, logits):
            seq = row.seq
            seq.num_computed = row.start + row.num_tokens
            if not row.samples:
                continue
            token = sample(row_logits[-1], seq.params, seq.token_rng(), seq.all_ids)
            events.append(seq.append(token))
            self._after_token(seq)
        return events

    def _after_token(self, seq: Sequence) -> None:
        """A finished sequence leaves the batch; its KV is freed, or kept for export."""
        if not seq.finished:
            return
        self._sequences.pop(seq.request_id, None)
        if seq.keep_kv and seq.finish_reason is not FinishReason.ABORT:
            self.scheduler.park(seq)
            self._parked[seq.request_id] = seq
        else:
            self.scheduler.finish(seq)

    def _batch(self, scheduled: SchedulerOutput) -> StepBatch:
        """Right-padded [B, S] inputs for the scheduled rows; padding writes to the scratch block (and no
        row is padding: each row's seq_slots is its own slot)."""
        rows = scheduled.rows
        B, S = len(rows), max(r.num_tokens for r in rows)
        block_size = self.allocator.layout.block_size
        max_blocks = max(len(r.seq.block_table) for r in rows)
        input_ids = np.zeros((B, S), np.int64)
        positions = np.zeros((B, S), np.int64)
        slots = np.full((B, S), SCRATCH_BLOCK * block_size, np.int64)
        tables = np.full((B, max_blocks), SCRATCH_BLOCK, np.int32)
        seq_slots = np.array([r.seq.slot for r in rows], np.int32)
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
            seq_slots=seq_slots,
        )

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Run one request to the end, yielding its events as they come (other requests advance too)."""
        return self._drive(self.add_request(prompt_ids, params))

    def generate_kept(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Like generate, but the finished sequence keeps its KV for export_kv (then release_kv)."""
        return self._drive(self.add_request(prompt_ids, params, keep_kv=True), abort_at_exit=False)

    def _drive(self, request_id: str, abort_at_exit: bool = True) -> Iterator[TokenEvent]:
        finished = False
        try:
            while True:
                events = self.step()
                if not events and not self.has_work():
                    raise RuntimeError(f"request {request_id} left the engine without finishing")
                for event in events:
                    if event.request_id == request_id:
                        finished = event.finish_reason is not None
                        yield event
                        if finished:
                            return
        finally:
            if abort_at_exit or not finished:
                self.abort(request_id)  # a caller that stops iterating frees the KV at once


__all__ = ["Engine", "EngineStats", "FinishReason", "RuntimeConfig", "SamplingParams", "TokenEvent"]
