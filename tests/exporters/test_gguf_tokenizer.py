"""The tokenizer rebuilt from SmolLM2's GGUF against llama.cpp's own tokenizer for that file.

The reference is llama-cpp-python loading the same GGUF with `vocab_only=True`: llama.cpp is the
program that defines what a GGUF's tokenizer metadata means. It is an optional extra, so CI (which
lacks it) checks `tests/data/tokenizer_expected.json` instead: ids the reference produced, written by

    pip install llama-cpp-python transformers && python -m tests.exporters.test_gguf_tokenizer

(llama-cpp-python is built from source by pip: about 15 minutes on two cores.)

transformers' own GGUF conversion is a second, weaker reference: it ignores `tokenizer.ggml.pre`
"smollm" (digits one by one, as SmolLM2's tokenizer.json has it), so it is compared only on text
with no digit in it.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import unicodedata
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer

from exporters.cli import embedded_model_path
from exporters.gguf_tokenizer import PRE_TOKENIZER_RULES, tokenizer_from_gguf, tokenizer_info_from_gguf

EXPECTED_FILE = Path(__file__).resolve().parent.parent / "data" / "tokenizer_expected.json"
NUM_EXPECTED = 40


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(embedded_model_path())


@pytest.fixture(scope="module")
def tokenizer(reader) -> Tokenizer:
    return tokenizer_from_gguf(reader)


# ----------------------------------------------------------------------------- the test strings

_HANDWRITTEN = [
    # whitespace
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n ",
    "\t\t\n  \n",
    "a  1",
    "a   b",
    "a\n\n\nb",
    " leading space",
    "trailing space ",
    "multiple   spaces   here",
    "tabs\tand\ttabs",
    "\t\tindented",
    "line1\nline2\r\nline3",
    "\u00a0no-break\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth",
    "line\u2028separator",
    "     ",
    "x" + " " * 17 + "y",
    "end with newline\n",
    # contractions and case
    "I'm",
    "you're",
    "we've",
    "they'll",
    "she'd",
    "it's",
    "don't",
    "DON'T",
    "I'M HERE",
    "O'Reilly's",
    "'s",
    "rock 'n' roll",
    "can't won't shouldn't",
    "''quoted''",
    "She said 'hi'.",
    # numbers
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159",
    "-273.15",
    "1,000,000",
    "1e-10",
    "0x1F",
    "2024-11-25",
    "12:30:45",
    "v1.2.3",
    "$19.99",
    "100%",
    "½ cup",
    "x² + y²",
    "٣٤٥ أرقام",
    "१२३ अंक",
    "Ⅻ roman",
    "①②③",
    "a1b2c3",
    " 2024",
    "pi=3.14",
    "x = 10 ** 9 + 7",
    # scripts
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "こんにちは世界",
    "你好，世界！",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Xin chào thế giới",
    "Ærøskøbing Straße",
    "naïve café résumé",
    "ﬁ ligature",
    "Ｆｕｌｌｗｉｄｔｈ",
    "e\u0301 combining",
    "Zalgo: z̷̢a̶l̴g̸o̵",
    "ᚠᛇᚻ runes",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "ǅ titlecase",
    "ß ẞ",
    "İstanbul ı",
    "ς σ Σ",
    "ትግርኛ",
    "ಕನ್ನಡ",
    "ქართული",
    "Հայերեն",
    "தமிழ்",
    "བོད་ཡིག",
    "ᠮᠣᠩᠭᠣᠯ",
    "𓀀𓀁 hieroglyphs",
    # emoji
    "😀",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🇺🇸🇯🇵",
    "❤️",
    "1️⃣",
    "🧑🏿‍💻 coding",
    "emoji😀inside",
    "😀😃😄😁",
    "👩‍❤️‍💋‍👨",
    "🫠🫶",
    "☕ coffee",
    "🤔?",
    " 🚀",
    # code
    "def f(x):\n    return x**2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '<div class="a">Hi</div>',
    '{"key": [1, 2, 3], "b": null}',
    "SELECT * FROM t WHERE id = 42;",
    "x => x * 2",
    "#include <stdio.h>",
    "a->b && c || !d",
    "```python\nprint('hi')\n```",
    "if x != 0 { y /= x }",
    "path/to/file.py:123",
    "https://example.com/a?b=c&d=e#f",
    "user@example.com",
    "    indented four",
    "\tfn main() {}",
    "λx.x",
    "~!@#$%^&*()_+`-=[]\\{}|;':\",./<>?",
    "....",
    "!!!???",
    "__init__",
    "snake_case_name CamelCaseName kebab-case",
    "$PATH:/usr/bin",
    "// comment\n/* block */",
    # special tokens in text
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    " <|im_start|> spaced ",
    "<|im_start|><|im_end|>",
    "<repo_name>x<file_sep>y",
    "<|im_start",
    "<|im_start|",
    "im_start|>",
    "<|IM_START|>",
    "<<|im_end|>>",
    "<jupyter_code>print(1)",
]

# Bytes SmolLM2's vocabulary has no token for (0x04, 0xF1...) are dropped by llama.cpp and by us
# alike, so these are compared with the reference but cannot round-trip.
_LOSSY = ["a\x04b", "\x13\x14", "\U00040000 plane four"]

_POOLS = {
    "latin": ["hello", "World", "the", "quick", "brown", "fox", "über", "naïve", "Zürich", "ça"],
    "cyrillic": ["привет", "Мир", "данные", "ёж"],
    "cjk": ["世界", "東京", "日本語", "한국어", "中文字", "カタカナ"],
    "other": ["مرحبا", "עברית", "हिन्दी", "ไทย", "Ελλάδα", "ᚠᛇ"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "🇫🇷", "❤️", "🤖", "🧑‍🚀"],
    "number": ["0", "7", "42", "1000", "3.5", "-12", "99999", "٣", "²"],
    "symbol": [".", ",", "!", "?", "...", "--", "()", "[]", "{}", "=>", "::", "#", "@", "'s", "'ll"],
    "code": ["def", "return", "x[i]", "foo()", "a+b", "i++", "&&", "<|im_end|>", "<|im_start|>"],
}
_SEPARATORS = [" ", " ", " ", "", "\n", "  ", "\t", " \n", "\n\n"]


def _generated(count: int, seed: int = 20241125) -> list[str]:
    rng = random.Random(seed)
    pools = sorted(_POOLS)
    out = []
    for _ in range(count):
        pieces = [rng.choice(_POOLS[rng.choice(pools)]) for _ in range(rng.randint(2, 7))]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(_SEPARATORS) + piece
        out.append(text)
    return out


def varied_strings() -> list[str]:
    """About 250 deterministic strings: scripts, emoji, code, numbers, whitespace, special tokens."""
    long_text = "\n".join(_HANDWRITTEN[60:140])
    return list(dict.fromkeys([*_HANDWRITTEN, *_generated(110), long_text]))


# ----------------------------------------------------------------------------- the reference


def reference_ids(strings: list[str]) -> list[list[int]]:
    """Ids llama.cpp gives each string for the SmolLM2 GGUF (special tokens parsed, BOS per the file)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(embedded_model_path()), vocab_only=True, verbose=False)
    return [llm.tokenize(s.encode("utf-8"), add_bos=True, special=True) if s else [] for s in strings]


def regenerate_expected(path: Path = EXPECTED_FILE) -> None:
    """Rewrite the committed expected ids from the reference (run this module as a script)."""
    strings = varied_strings()
    step = len(strings) // NUM_EXPECTED
    chosen = [*strings[::step][: NUM_EXPECTED - len(_LOSSY)], *_LOSSY]
    version = importlib.metadata.version("llama-cpp-python")
    cases = [{"text": s, "ids": ids} for s, ids in zip(chosen, reference_ids(chosen), strict=True)]
    body = {
        "model": embedded_model_path().name,
        "generated_by": f"llama-cpp-python {version}: "
        "Llama(vocab_only=True).tokenize(add_bos=True, special=True)",
        "regenerate": "python -m tests.exporters.test_gguf_tokenizer",
        "cases": cases,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the tests


def test_there_are_enough_varied_strings():
    strings = varied_strings()
    assert len(strings) >= 200
    assert "" in strings
    assert any("\u200d" in s for s in strings), "needs emoji ZWJ sequences"


def test_matches_llama_cpp(tokenizer):
    strings = [*varied_strings(), *_LOSSY]
    expected = reference_ids(strings)
    ours = [tokenizer.encode(s).ids for s in strings]
    mismatches = [(s, got, ids) for s, got, ids in zip(strings, ours, expected, strict=True) if got != ids]
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, first: {mismatches[:3]}"


def test_decode_matches_llama_cpp(tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(embedded_model_path()), vocab_only=True, verbose=False)
    for s in varied_strings():
        ids = tokenizer.encode(s).ids
        assert tokenizer.decode(ids, skip_special_tokens=False).encode() == llm.detokenize(ids, special=True)


def test_matches_transformers_gguf_conversion_on_text_without_digits(tokenizer):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    path = embedded_model_path()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strings = [s for s in varied_strings() if not any(unicodedata.category(c)[0] == "N" for c in s)]
    assert len(strings) >= 150
    for s in strings:
        assert tokenizer.encode(s).ids == reference.encode(s, add_special_tokens=True), repr(s)


def test_matches_committed_expected_ids(tokenizer):
    body = json.loads(EXPECTED_FILE.read_text(encoding="utf-8"))
    assert len(body["cases"]) >= NUM_EXPECTED
    for case in body["cases"]:
        assert tokenizer.encode(case["text"]).ids == case["ids"], repr(case["text"])


def test_digits_are_split_one_by_one(tokenizer):
    # The smollm rule: "a  1" is "a", "  ", "1" (plain GPT-2 would give "a", " ", " 1").
    assert tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def test_special_tokens_stay_whole(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"


@pytest.mark.parametrize("text", varied_strings())
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_save_and_reload_is_identical(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    reloaded = Tokenizer.from_file(str(path))
    assert reloaded.to_str() == tokenizer.to_str()
    for s in varied_strings()[::10]:
        assert reloaded.encode(s).ids == tokenizer.encode(s).ids


def test_info(reader):
    info = tokenizer_info_from_gguf(reader)
    assert (info.bos_token_id, info.eos_token_id, info.unk_token_id, info.pad_token_id) == (1, 2, 0, 2)
    assert (info.bos_token, info.eos_token, info.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert not info.add_bos_token and not info.add_eos_token
    assert info.stop_token_ids == [2]
    assert info.chat_template.startswith("{% for message in messages %}")


# ----------------------------------------------------------------------------- small synthetic GGUFs


def _write_tiny_gguf(path: Path, *, model: str = "gpt2", pre: str | None = "smollm", add_bos=None) -> Path:
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<s>", "</s>", *ByteLevel.alphabet()]
    merges = ["h e", "l l", "he ll", "Ġ w"]
    tokens += ["he", "ll", "hell", "Ġw"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_unknown_pre_tokenizer_raises(tmp_path):
    reader = gguf.GGUFReader(_write_tiny_gguf(tmp_path / "t.gguf", pre="klingon-bpe"))
    with pytest.raises(ValueError, match="klingon-bpe"):
        tokenizer_from_gguf(reader)


def test_unknown_tokenizer_model_raises(tmp_path):
    reader = gguf.GGUFReader(_write_tiny_gguf(tmp_path / "t.gguf", model="llama"))
    with pytest.raises(ValueError, match="'llama'"):
        tokenizer_from_gguf(reader)


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_RULES))
def test_every_known_pre_tokenizer_builds_and_round_trips(tmp_path, pre):
    reader = gguf.GGUFReader(_write_tiny_gguf(tmp_path / "t.gguf", pre=pre, add_bos=False))
    tokenizer = tokenizer_from_gguf(reader)
    text = "hello world 12345 it's <s>!"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_llama_bpe_adds_bos_unless_the_file_says_otherwise(tmp_path):
    default = tokenizer_from_gguf(gguf.GGUFReader(_write_tiny_gguf(tmp_path / "a.gguf", pre="llama-bpe")))
    hell = default.token_to_id("hell")
    assert default.encode("hell").ids == [0, hell]
    off = tokenizer_from_gguf(
        gguf.GGUFReader(_write_tiny_gguf(tmp_path / "b.gguf", pre="llama-bpe", add_bos=False))
    )
    assert off.encode("hell").ids == [hell]


def test_missing_pre_tokenizer_falls_back_to_default(tmp_path):
    reader = gguf.GGUFReader(_write_tiny_gguf(tmp_path / "t.gguf", pre=None))
    assert tokenizer_from_gguf(reader).encode("hell").tokens == ["hell"]


if __name__ == "__main__":
    regenerate_expected()
    print(f"wrote {EXPECTED_FILE}")
