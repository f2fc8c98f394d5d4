"""Protobuf <-> runtime types shared by several services (sampling settings, token events)."""

from __future__ import annotations

import numpy as np

from protos.edge.v1 import common_pb2, decode_pb2
from runtime.errors import InvalidRequestError
from runtime.sampling import SamplingParams
from runtime.sequence import FinishReason, TokenEvent

FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Runtime settings; a missing or bad field raises InvalidRequestError naming it."""
    if pb.max_tokens <= 0:
        raise InvalidRequestError(f"sampling.max_tokens: must be >= 1, got {pb.max_tokens}")
    for text in pb.stop:
        if not text:
            raise InvalidRequestError("sampling.stop: stop strings must not be empty")
    try:
        return SamplingParams(
            max_tokens=pb.max_tokens,
            temperature=pb.temperature,
            top_k=pb.top_k,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
            seed=pb.seed if pb.HasField("seed") else None,
            stop=tuple(pb.stop),
            ignore_eos=pb.ignore_eos,
        )
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling.{e}") from None


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def kv_wire_rows(array: np.ndarray, per: str) -> np.ndarray:
    """The rows a KV pool tensor's export travels in (KvChunk.token_start/token_count count them): its
    token rows for a per-token tensor; single bytes for a per-block or per-slot one (SAQ's records and
    slots are opaque bytes, one of which can be larger than a chunk). A view of `array` (contiguous)."""
    if per == "token":
        return array
    return array.reshape(-1).view(np.uint8).reshape(-1, 1)


def event_to_pb(event: TokenEvent, prompt_tokens: int) -> decode_pb2.TokenEvent:
    pb = decode_pb2.TokenEvent(
        text=event.text, index=event.index, finish_reason=FINISH_TO_PB[event.finish_reason]
    )
    if event.token_id is not None:
        pb.token_id = event.token_id
    if event.finish_reason is not None:
        pb.usage.prompt_tokens = prompt_tokens
        pb.usage.completion_tokens = event.index + (event.token_id is not None)
    return pb
