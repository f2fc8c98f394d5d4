"""Tokenizer service: protobuf in, protobuf out; the work is runtime.tokenizer.Tokenizer's."""

from __future__ import annotations

import asyncio

from protos.edge.v1 import tokenizer_pb2
from runtime.errors import InvalidRequestError, UnavailableError
from runtime.tokenizer import Tokenizer

MAX_TEXT_BYTES = 4 * 2**20


class TokenizerServicer:
    """Protobuf in, protobuf out. Calls before `attach` (model still loading) get UNAVAILABLE."""

    def __init__(self, model_name: str) -> None:
        self._tokenizer: Tokenizer | None = None
        self._model = model_name

    def attach(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise UnavailableError("the tokenizer is still loading; retry shortly")
        return self._tokenizer

    async def Encode(self, request, context):
        _check_size("text", request.text)
        ids = await asyncio.to_thread(
            self.tokenizer.encode, request.text, add_special_tokens=request.add_special_tokens
        )
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    async def Decode(self, request, context):
        text = self.tokenizer.decode(list(request.token_ids), skip_special_tokens=request.skip_special_tokens)
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def ApplyChatTemplate(self, request, context):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        for i, m in enumerate(messages):
            _check_size(f"messages[{i}].content", m["content"])
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=request.add_generation_prompt
        )
        ids = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=False)
        return tokenizer_pb2.ChatTemplateResponse(text=text, token_ids=ids)

    async def Info(self, request, context):
        t = self.tokenizer
        info = tokenizer_pb2.TokenizerInfo(
            model=self._model,
            vocab_size=t.vocab_size,
            eos_token_ids=t.eos_token_ids,
            chat_template=t.chat_template or "",
        )
        if t.bos_token_id is not None:
            info.bos_token_id = t.bos_token_id
        return info


def _check_size(field: str, text: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise InvalidRequestError(f"{field}: longer than {MAX_TEXT_BYTES} bytes; send less text")
