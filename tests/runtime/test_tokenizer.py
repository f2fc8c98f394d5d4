"""runtime.tokenizer on SmolLM2's tokenizer: chat template, sandbox, streaming detokenization."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from exporters.cli import embedded_model_path
from exporters.gguf_tokenizer import GGUFTokenizerInfo, tokenizer_from_gguf, tokenizer_info_from_gguf
from runtime.errors import ArtifactError, InvalidRequestError
from runtime.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

SYSTEM_AND_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number."},
]
USER_ONLY = [{"role": "user", "content": "What is 2+2?"}]
USER_ONLY_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
STREAM_TEXT = "Tokyo 東京 は晴れ ☀️; family: 👨‍👩‍👧‍👦, flags 🇯🇵🇰🇷, 한국어 and emoji 🫠 — done. 𝔘𝔫𝔦"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> tuple[Path, GGUFTokenizerInfo]:
    reader = gguf.GGUFReader(embedded_model_path())
    path = tmp_path_factory.mktemp("artifact") / "tokenizer.json"
    tokenizer_from_gguf(reader).save(str(path))
    return path, tokenizer_info_from_gguf(reader)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json) -> Tokenizer:
    path, info = tokenizer_json
    return Tokenizer.from_file(
        path,
        chat_template=info.chat_template,
        bos_token_id=info.bos_token_id,
        eos_token_ids=info.stop_token_ids,
    )


def with_template(tokenizer_json, template: str) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_json[0], chat_template=template)


# ----------------------------------------------------------------------------- encode / decode


def test_encode_decode(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_token_ids == [2] and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.encode("<|im_start|>user\nHi 😀<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi 😀<|im_end|>"
    assert tokenizer.decode(ids) == "user\nHi 😀"


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(InvalidRequestError, match="49152"):
        tokenizer.decode([5, 49152])


def test_missing_or_broken_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


# ----------------------------------------------------------------------------- chat template


def test_user_only_conversation_gets_the_default_system_prompt(tokenizer):
    assert tokenizer.apply_chat_template(USER_ONLY) == USER_ONLY_PROMPT


def test_no_generation_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template(USER_ONLY, add_generation_prompt=False)
    assert prompt == USER_ONLY_PROMPT.removesuffix("<|im_start|>assistant\n")


def test_chat_template_matches_transformers(tokenizer_json, tokenizer):
    transformers = pytest.importorskip("transformers")
    path, info = tokenizer_json
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        chat_template=info.chat_template,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
    )
    for messages in (SYSTEM_AND_USER, USER_ONLY):
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            got = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert got == expected, (messages, add_generation_prompt)


def test_template_vars_and_trim_blocks(tokenizer_json):
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "[{{ m.content | tojson }}]{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ greeting }}{% endif %}"
    )
    tokenizer = Tokenizer.from_file(tokenizer_json[0], chat_template=template, eos_token_ids=[2])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "héllo"}], greeting="go")
    assert prompt == '["héllo"]<|im_end|>\ngo'


def test_template_raise_exception_is_a_chat_template_error(tokenizer_json):
    tokenizer = with_template(
        tokenizer_json,
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
    )
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert issubclass(ChatTemplateError, InvalidRequestError)


def test_messages_are_checked(tokenizer):
    for bad in ([], "hi", [{"content": "no role"}], ["not a dict"]):
        with pytest.raises(InvalidRequestError, match="messages"):
            tokenizer.apply_chat_template(bad)


def test_no_template_is_an_invalid_request(tokenizer_json):
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_file(tokenizer_json[0]).apply_chat_template(USER_ONLY)


def test_template_syntax_error_is_an_artifact_error(tokenizer_json):
    with pytest.raises(ArtifactError, match="does not compile"):
        with_template(tokenizer_json, "{% for m in messages %}")


# ----------------------------------------------------------------------------- sandbox


def test_sandbox_stops_escape_through_dunder_attributes(tokenizer_json, tmp_path):
    marker = tmp_path / "pwned"
    escapes = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
    ]
    for template in escapes:
        with pytest.raises(ArtifactError, match="unsafe"):
            with_template(tokenizer_json, template).apply_chat_template(USER_ONLY)
    assert not marker.exists()


def test_sandbox_hides_dunder_attributes(tokenizer_json):
    tokenizer = with_template(tokenizer_json, "[{{ messages.__class__ }}][{{ messages[0].__dict__ }}]")
    assert tokenizer.apply_chat_template(USER_ONLY) == "[][]"


def test_sandbox_is_immutable(tokenizer_json):
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = with_template(tokenizer_json, "{% set _ = messages.append({'role': 'x'}) %}ok")
    with pytest.raises(ArtifactError, match="unsafe"):
        tokenizer.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------- streaming


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detokenizer.feed(i) for i in ids] + [detokenizer.flush()]


def test_incremental_detokenizer_equals_whole_decode(tokenizer):
    ids = tokenizer.encode(STREAM_TEXT)
    # The test only means something if some tokens hold part of a character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == "", "every character was complete before the end"


def test_incremental_detokenizer_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n🌸 花<|im_end|>")
    assert "".join(stream(tokenizer, ids)) == "assistant\n🌸 花"
    kept = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(kept) == "<|im_start|>assistant\n🌸 花<|im_end|>"


def test_flush_returns_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("a😀")
    partial = ids[:-1]
    deltas = stream(tokenizer, partial)
    assert "".join(deltas[:-1]) == "a"
    assert deltas[-1] == tokenizer.decode(partial)[1:] and deltas[-1].endswith("\ufffd")
