"""Which sequences run in the next step, and on which tokens. No tensors here.

Each step is either a prefill step or a decode step:

- prefill: waiting prompts are admitted in arrival order while KV blocks and the batch allow;
  rows are prompt chunks of at most `max_step_tokens` tokens in all (padded to the longest row), so
  a long prompt takes several steps and running sequences are not stalled for long;
- decode: every running sequence whose prompt is done contributes its one newest token.

Prefill steps come first when a prompt is pending, but a decode step runs between two prefill steps
whenever sequences are decoding, so inter-token latency stays bounded while prompts arrive.
A sequence gets all its KV blocks (prompt + max_tokens; those its format pages, runtime/kv_cache.py),
and its KV slot when the format has per-sequence tensors, at admission and gives them back in `finish`,
whatever the reason. A prompt waits while the blocks or a slot are not free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from runtime.errors import ContextOverflowError, ResourceExhaustedError
from runtime.kv_cache import SCRATCH_SLOT, KVBlockAllocator
from runtime.sequence import Sequence


@dataclass(frozen=True)
class ScheduledRow:
    """Run `num_tokens` ids of `seq` starting at its position `start`."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this row's last token produces the next token (end of the prompt, or decode)."""
        return self.start + self.num_tokens == self.seq.num_ids


@dataclass(frozen=True)
class SchedulerOutput:
    rows: list[ScheduledRow]
    is_prefill: bool


class Scheduler:
    def __init__(
        self, allocator: KVBlockAllocator, *, max_batch_size: int, max_step_tokens: int, max_queue: int
    ) -> None:
        self.allocator = allocator
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        """Queue a request; refuse it at once when it could never fit or the queue is full."""
        capacity = self.allocator.capacity_tokens
        if seq.max_total_len > capacity:
            raise ContextOverflowError(
                f"prompt ({seq.prompt_len} tokens) + max_tokens ({seq.params.max_tokens}) needs "
                f"{seq.max_total_len} tokens of KV cache, this node holds {capacity}; lower max_tokens "
                "or shorten the prompt"
            )
        if len(self.waiting) >= self.max_queue:
            raise ResourceExhaustedError(
                f"{len(self.waiting)} requests already wait for KV memory (max_queue); retry later"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        decoding = [s for s in self.running if not s.in_prefill]
        prefer_decode = decoding and self._last_was_prefill
        if not prefer_decode:
            rows = self._prefill_rows()
            if rows:
                self._last_was_prefill = True
                return SchedulerOutput(rows, is_prefill=True)
        self._last_was_prefill = False
        if decoding:
            return SchedulerOutput([ScheduledRow(s, s.num_ids - 1, 1) for s in decoding], is_prefill=False)
        return None

    def _prefill_rows(self) -> list[ScheduledRow]:
        """Chunks of prompts in progress, then newly admitted prompts, within the step's budget."""
        rows: list[ScheduledRow] = []
        longest = 0
        candidates = [s for s in self.running if s.in_prefill] + [s for s in self.waiting if s.in_prefill]
        for seq in candidates:
            if len(rows) == self.max_batch_size:
                break
            remaining = seq.prompt_len - seq.num_computed
            chunk = min(remaining, self.max_step_tokens // (len(rows) + 1))
            if chunk < 1 or max(longest, chunk) * (len(rows) + 1) > self.max_step_tokens:
                break
            if seq not in self.running and not self._admit(seq):
                break
            longest = max(longest, chunk)
            rows.append(ScheduledRow(seq, seq.num_computed, chunk))
        return rows

    def _admit(self, seq: Sequence) -> bool:
        if len(self.running) >= self.max_batch_size or not self.allocator.can_allocate(seq.max_total_len):
            return False
        seq.block_table = self.allocator.allocate(seq.request_id, seq.max_total_len)
        seq.slot = self.allocator.slot(seq.request_id)
        self.waiting.remove(seq)
        self.running.append(seq)
        return True

    def admit_imported(self) -> list[Sequence]:
        """Admit waiting sequences whose prompt KV was computed elsewhere (no prefill needed)."""
        admitted = []
        for seq in [s for s in self.waiting if not s.in_prefill]:
            if not self._admit(seq):
                break
            admitted.append(seq)
        return admitted

    def park(self, seq: Sequence) -> None:
        """Take a finished sequence out of the batch but keep its KV blocks and slot (freed by `finish`)."""
        self.running.remove(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and free its KV blocks and slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.request_id)
        seq.block_table, seq.slot = [], SCRATCH_SLOT
