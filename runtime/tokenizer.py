"""Text <-> token ids for the runtime: an artifact's `tokenizer.json`, its chat template, streaming text.

    tokenizer = Tokenizer.from_file(artifact.tokenizer_file, chat_template=..., eos_token_ids=[2])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(prompt)
    detok = IncrementalDetokenizer(tokenizer)
    for token_id in generated:
        send(detok.feed(token_id))   # only whole characters, never a half emoji
    send(detok.flush())

Chat templates are Jinja, rendered the way Hugging Face `apply_chat_template` renders them
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, `raise_exception`, a `tojson` that keeps non-ASCII)
inside jinja2's immutable sandbox: a template comes with a downloaded model and is untrusted code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import ArtifactError, InvalidRequestError


class ChatTemplateError(InvalidRequestError):
    """The chat template refused these messages (it called `raise_exception`, or a field it reads is
    missing or of the wrong type); the message says what the template objected to."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox; a syntax error raises `ArtifactError`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ArtifactError(
            f"chat template does not compile (line {e.lineno}: {e.message}); re-export"
        ) from e


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for name, token_id in [("bos_token_id", bos_token_id)] + [
            ("eos_token_ids", i) for i in eos_token_ids
        ]:
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ArtifactError(
                    f"{name} {token_id} is outside the vocabulary of {self.vocab_size} tokens"
                )
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template
        self._template = None if chat_template is None else compile_chat_template(chat_template)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> Tokenizer:
        """Load a `tokenizer.json`; a missing or unreadable file raises `ArtifactError`."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: tokenizer file missing; re-run export-model")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ArtifactError(f"{path}: not a valid tokenizer.json ({e}); re-run export-model") from e
        return cls(
            backend, chat_template=chat_template, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids
        )

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self._backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) stay whole;
        `add_special_tokens` adds the BOS/EOS the model's tokenizer.json asks for."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an id outside the vocabulary raises `InvalidRequestError`."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: object
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into the model's prompt text.

        `template_vars` reach the template as extra variables (`tools=...`, `enable_thinking=...`).
        """
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; send a plain prompt instead of messages"
            )
        _check_messages(messages)
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **template_vars,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**context)
        except jinja2.exceptions.SecurityError as e:
            raise ArtifactError(f"chat template tried an unsafe operation and was stopped: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"chat template rejected the messages: {e}") from e


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be a dict with a string 'role'")


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a character.

    Byte-level BPE cuts an emoji's four UTF-8 bytes over several tokens; decoding those one at a
    time would print U+FFFD. Instead, keep the ids not yet printed and decode them together with
    the chunk printed last (for context: some decoders treat the first token differently), and print
    the new text only once it does not end in U+FFFD. `flush()` prints whatever is left, invalid or
    not, at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._context_ids: list[int] = []
        self._context_text = ""
        self._pending_ids: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while a character is still partial)."""
        self._pending_ids.append(token_id)
        text = self._decode(self._context_ids + self._pending_ids)
        if len(text) <= len(self._context_text) or text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return the text of every id not printed yet, even an incomplete character."""
        if not self._pending_ids:
            return ""
        return self._emit(self._decode(self._context_ids + self._pending_ids))

    def _emit(self, text: str) -> str:
        assert text.startswith(self._context_text), "decoding more ids changed text already printed"
        delta = text[len(self._context_text) :]
        self._context_ids, self._pending_ids = self._pending_ids, []
        self._context_text = self._decode(self._context_ids)
        return delta
