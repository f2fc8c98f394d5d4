"""Sampling: request settings and the choice of the next token from one row of logits.

    logits -> repetition penalty -> (temperature 0: argmax) -> temperature -> top-k -> top-p -> draw

All in numpy float64 on the row; the seedable generator lives with each request, so a seeded
request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation."""

    max_tokens: int = 128  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus mass in (0, 1]
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    seed: int | None = None  # fixes the draws of a sampled request
    stop: tuple[str, ...] = field(default_factory=tuple)  # generation ends before any of these strings
    ignore_eos: bool = False  # keep generating past end-of-sequence

    def __post_init__(self) -> None:
        checks = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                "max_tokens",
                "must be an integer >= 1",
            ),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 = off)"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings"),
            (
                all(0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
                "stop",
                f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise InvalidRequestError(f"{name}: {rule}; got {getattr(self, name)!r}")


def sample(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: np.ndarray | None = None
) -> int:
    """The next token id from logits [V]; `history` holds prompt and output ids for the penalty."""
    x = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and history is not None and len(history):
        seen = np.unique(history)
        x[seen] = np.where(
            x[seen] > 0, x[seen] / params.repetition_penalty, x[seen] * params.repetition_penalty
        )
    if params.temperature == 0:
        return int(np.argmax(x))
    x /= params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x[x < kth] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < params.top_p  # the smallest prefix reaching top_p
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
