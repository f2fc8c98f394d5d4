"""One request's state as it moves through the engine, and how its output grows.

    prompt ids -> (prefill chunks) -> sampled tokens -> text deltas -> finished

Text leaves a sequence only when it is final: complete UTF-8 characters (the incremental
detokenizer) that cannot be the start of a stop string. A stop string ends generation and is not
part of the output; so does an end-of-sequence token unless the request ignores EOS.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from runtime.sampling import SamplingParams
from runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller or its deadline


@dataclass(frozen=True)
class ImportedKV:
    """A prompt's KV cache computed elsewhere (a prefill node) and the token it sampled next.

    layers[i] = one [rows, width] array per pool tensor of the artifact's KV format
    (runtime.kv_cache.pool_tensors: K, V, then their scales for a quantized format; SAQ's records and
    slot), as Engine.kv_shapes gives them: [the prompt's tokens, width] for a per-token tensor; SAQ: [the
    prompt's bottom-stair stages, record bytes] and [1, the slot's bytes in use].
    """

    first_token_id: int
    layers: list[tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it made final."""

    request_id: str
    token_id: int | None  # None only on the final event of an aborted request
    text: str
    index: int  # 0-based position in the output
    finish_reason: FinishReason | None = None


class Sequence:
    """A request: its ids, its place in the KV cache, its sampler and its output text."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        *,
        keep_kv: bool = False,
        imported: ImportedKV | None = None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.ids = np.array(prompt_ids, dtype=np.int64)  # prompt then output; grown by append
        self.num_ids = len(prompt_ids)
        self.num_computed = 0  # ids whose K and V are in the cache
        self.block_table: list[int] = []
        self.slot = 0  # its row of the per-sequence KV tensors (SAQ); 0, the scratch slot, when it holds none
        self.finish_reason: FinishReason | None = None
        self.keep_kv = keep_kv  # finished sequences keep their blocks until released (KV handoff)
        self.imported = imported  # written into the cache at admission, then dropped
        if imported is not None:
            self.num_computed = self.prompt_len
        self._rng = np.random.default_rng()
        self._eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._held = ""  # final characters that might begin a stop string

    def token_rng(self) -> np.random.Generator:
        """The generator for the next token: a seeded request draws the same token at the same
        output position whichever node samples it (prefill or decode) and whatever else runs."""
        if self.params.seed is None:
            return self._rng
        return np.random.default_rng([self.params.seed, self.num_output])

    @property
    def all_ids(self) -> np.ndarray:
        return self.ids[: self.num_ids]

    @property
    def num_output(self) -> int:
        return self.num_ids - self.prompt_len

    @property
    def max_total_len(self) -> int:
        """Prompt plus every token the request may generate: what its KV blocks must hold."""
        return self.prompt_len + self.params.max_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> TokenEvent:
        """Record a sampled token; return its event (with finish_reason when it ends the sequence)."""
        if self.num_ids == len(self.ids):
            self.ids = np.concatenate([self.ids, np.zeros(max(16, len(self.ids)), np.int64)])
        self.ids[self.num_ids] = token_id
        self.num_ids += 1
        index = self.num_output - 1
        if token_id in self._eos:
            text = self._release_all()
            self.finish_reason = FinishReason.STOP
            return TokenEvent(self.request_id, token_id, text, index, self.finish_reason)
        text = self._stop_filter(self._detokenizer.feed(token_id))
        if self.finish_reason is None and self.num_output >= self.params.max_tokens:
            text += self._release_all()
            self.finish_reason = self.finish_reason or FinishReason.LENGTH
        return TokenEvent(self.request_id, token_id, text, index, self.finish_reason)

    def abort(self) -> TokenEvent:
        """End the sequence now; the returned event closes its stream (it carries no token)."""
        if self.finish_reason is None:
            self.finish_reason = FinishReason.ABORT
        return TokenEvent(self.request_id, None, "", self.num_output, FinishReason.ABORT)

    def _release_all(self) -> str:
        """The rest of the text at the end of generation (a stop string may still cut it)."""
        text = self._stop_filter(self._detokenizer.flush())
        if self.finish_reason is None:
            text, self._held = text + self._held, ""
        return text

    def _stop_filter(self, delta: str) -> str:
        """Return the part of held + delta that is final; a stop string sets finish_reason STOP."""
        if not self.params.stop:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.finish_reason = FinishReason.STOP
            self._held = ""
            return text[: min(hits)]
        keep = max(_overlap(text, s) for s in self.params.stop)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
