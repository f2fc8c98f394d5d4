"""Rebuild a `tokenizers` byte-level BPE tokenizer from a GGUF file's metadata.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, a per-token type
and the special token ids as metadata, and names the pre-tokenizer (the regex that cuts text into
words before BPE) with a short string, `tokenizer.ggml.pre`. This module reads those keys and
builds the same tokenizer with the `tokenizers` library, so that an artifact can ship a plain
`tokenizer.json`:

    reader = gguf.GGUFReader(path)
    tokenizer_from_gguf(reader).save("artifact/tokenizer.json")
    info = tokenizer_info_from_gguf(reader)   # bos/eos/unk/pad, chat template

The story, top to bottom: read the metadata -> pick the pre-tokenizer splits by name -> BPE model
over the byte-level vocabulary -> control and user-defined tokens as added tokens (never split) ->
byte-level decoder -> BOS/EOS post-processor.

The split regexes mirror llama.cpp's `llm_tokenizer_bpe` (src/llama-vocab.cpp): each regex cuts
every piece the previous one left, keeping both the matches and the text between them, which is
what `pre_tokenizers.Split(..., behavior="isolated")` does. Only the byte-level BPE tokenizer
model (`tokenizer.ggml.model = gpt2`) is supported; sentencepiece (`llama`) and others raise.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# GPT-2's word regex: contractions, letters, numbers, other symbols, whitespace runs.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# Llama 3's regex as its tokenizer.json spells it (llama.cpp spells the case-insensitive group out).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerRule:
    """How one `tokenizer.ggml.pre` name cuts text before BPE, and the defaults it implies."""

    splits: tuple[str, ...]
    """Regexes applied in order; each cuts every piece left by the one before."""
    ignore_merges: bool = False
    """Look a whole word up in the vocabulary before merging (llama.cpp's `ignore_merges`)."""
    add_bos_default: bool = False
    """Whether to add BOS when the file has no `tokenizer.ggml.add_bos_token` key."""


_GPT2_RULE = PreTokenizerRule(splits=(_GPT2_SPLIT,))
# Every digit is its own word (HF: `Digits(individual_digits=True)` before `ByteLevel`).
_DIGITS_RULE = PreTokenizerRule(splits=(r"\p{N}", _GPT2_SPLIT))
_LLAMA3_RULE = PreTokenizerRule(splits=(_LLAMA3_SPLIT,), ignore_merges=True, add_bos_default=True)

PRE_TOKENIZER_RULES: dict[str, PreTokenizerRule] = {
    # llama.cpp's fallback for BPE files that name no pre-tokenizer, and for "default".
    "default": PreTokenizerRule(
        splits=(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ),
    "gpt-2": _GPT2_RULE,
    "phi-2": _GPT2_RULE,
    "mpt": _GPT2_RULE,
    "olmo": _GPT2_RULE,
    "smollm": _DIGITS_RULE,
    "starcoder": _DIGITS_RULE,
    "refact": _DIGITS_RULE,
    "llama3": _LLAMA3_RULE,
    "llama-v3": _LLAMA3_RULE,
    "llama-bpe": _LLAMA3_RULE,
    "falcon3": _LLAMA3_RULE,
    "pixtral": _LLAMA3_RULE,
}
"""`tokenizer.ggml.pre` -> its rule. Add a name here after checking its regexes in llama.cpp."""

# llama.cpp's `llama_token_type` values in `tokenizer.ggml.token_type`.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    """The special tokens and chat template a GGUF declares, for an artifact's config."""

    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    eot_token_id: int | None
    """End of turn (`tokenizer.ggml.eot_token_id`), set by some chat models besides EOS."""
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    """The Jinja template in `tokenizer.chat_template`, or None when the file has none."""

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS and EOT, deduplicated: generation ends at any of them."""
        ids = [i for i in (self.eos_token_id, self.eot_token_id) if i is not None]
        return list(dict.fromkeys(ids))


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required_field(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF has no '{key}': cannot rebuild its tokenizer")
    return field.contents()


def _check_tokenizer_model(reader: gguf.GGUFReader) -> None:
    model = _required_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"unsupported tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2') can be rebuilt"
        )


def _pre_tokenizer_name(reader: gguf.GGUFReader) -> str:
    # llama.cpp treats a missing or empty name as "default" (and warns that quality degrades).
    return _field(reader, "tokenizer.ggml.pre") or "default"


def pre_tokenizer_rule(name: str) -> PreTokenizerRule:
    """The rule for a `tokenizer.ggml.pre` name; an unknown name raises `ValueError`."""
    rule = PRE_TOKENIZER_RULES.get(name)
    if rule is None:
        raise ValueError(
            f"unknown GGUF pre-tokenizer tokenizer.ggml.pre={name!r}; "
            f"supported: {', '.join(sorted(PRE_TOKENIZER_RULES))}"
        )
    return rule


def _add_bos_eos(reader: gguf.GGUFReader, rule: PreTokenizerRule) -> tuple[bool, bool]:
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", rule.add_bos_default))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    return add_bos, add_eos


def _bpe_model(tokens: list[str], merges: list[str], rule: PreTokenizerRule) -> models.BPE:
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    # No unk token: like llama.cpp, a byte the vocabulary lacks (SmolLM2 has no 0x04, no 0xF1) is dropped.
    pairs = []
    for line in merges:
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {line!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return models.BPE(vocab=vocab, merges=pairs, ignore_merges=rule.ignore_merges)


def _pre_tokenizer(rule: PreTokenizerRule) -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _added_tokens(tokens: list[str], token_types: list[int]) -> tuple[list[AddedToken], list[AddedToken]]:
    """(control tokens as special added tokens, user-defined tokens as plain added tokens).

    Both kinds are matched whole in any text, so `<|im_start|>` is never cut into pieces. Only
    control tokens are `special`, i.e. dropped by `decode(skip_special_tokens=True)`: llama.cpp
    always prints user-defined ones, like `<think>`.
    """
    control, user_defined = [], []
    for token, token_type in zip(tokens, token_types, strict=True):
        if token_type == _TOKEN_TYPE_CONTROL:
            control.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _TOKEN_TYPE_USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    return control, user_defined


def _post_processor(
    tokens: list[str], bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool
) -> processors.PostProcessor | None:
    if not add_bos and not add_eos:
        return None
    for flag, name, token_id in ((add_bos, "bos", bos_id), (add_eos, "eos", eos_id)):
        if flag and (token_id is None or not 0 <= token_id < len(tokens)):
            raise ValueError(f"GGUF sets add_{name}_token but its {name} token id is {token_id!r}")
    bos = [tokens[bos_id]] if add_bos else []
    eos = [tokens[eos_id]] if add_eos else []
    specials = list({tokens[i]: i for i, flag in ((bos_id, add_bos), (eos_id, add_eos)) if flag}.items())
    return processors.TemplateProcessing(
        single=" ".join([*bos, "$A", *eos]),
        pair=" ".join([*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)]),
        special_tokens=specials,
    )


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the one llama.cpp builds from this GGUF's metadata.

    Raises `ValueError` naming the problem for an unsupported `tokenizer.ggml.model`, an unknown
    `tokenizer.ggml.pre`, or metadata that is missing or inconsistent.
    """
    _check_tokenizer_model(reader)
    rule = pre_tokenizer_rule(_pre_tokenizer_name(reader))
    tokens = list(_required_field(reader, "tokenizer.ggml.tokens"))
    merges = list(_required_field(reader, "tokenizer.ggml.merges"))
    # llama.cpp reads a file without token types as all normal tokens.
    token_types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(token_types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types")

    tokenizer = Tokenizer(_bpe_model(tokens, merges, rule))
    tokenizer.pre_tokenizer = _pre_tokenizer(rule)
    tokenizer.decoder = decoders.ByteLevel()
    control, user_defined = _added_tokens(tokens, token_types)
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)

    add_bos, add_eos = _add_bos_eos(reader, rule)
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    post = _post_processor(tokens, bos_id, eos_id, add_bos, add_eos)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer


def tokenizer_info_from_gguf(reader: gguf.GGUFReader) -> GGUFTokenizerInfo:
    """The special token ids and strings, BOS/EOS flags and chat template the GGUF declares."""
    _check_tokenizer_model(reader)
    tokens = _required_field(reader, "tokenizer.ggml.tokens")
    rule = pre_tokenizer_rule(_pre_tokenizer_name(reader))
    add_bos, add_eos = _add_bos_eos(reader, rule)

    def token_id(name: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None and not 0 <= value < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{name}_token_id={value} is outside the vocabulary")
        return value

    ids = {name: token_id(name) for name in ("bos", "eos", "unknown", "padding", "eot")}
    text = {name: None if i is None else tokens[i] for name, i in ids.items()}
    return GGUFTokenizerInfo(
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        unk_token_id=ids["unknown"],
        pad_token_id=ids["padding"],
        eot_token_id=ids["eot"],
        bos_token=text["bos"],
        eos_token=text["eos"],
        unk_token=text["unknown"],
        pad_token=text["padding"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
