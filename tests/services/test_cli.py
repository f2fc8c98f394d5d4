"""`edge generate` on the tiny model: JSON output, and bad input -> one clear line and exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest

from services.cli import main


def _generate(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_has_one_object_per_token_and_a_summary(tiny_artifact, capsys):
    code, out, _ = _generate(
        capsys, "--artifact", str(tiny_artifact), "--json", "--max-tokens", "5", "--ignore-eos", "Hi"
    )
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert code == 0 and [line["index"] for line in lines[:-1]] == [0, 1, 2, 3, 4]
    assert all(isinstance(line["token_id"], int) and "text" in line for line in lines[:-1])
    summary = lines[-1]
    assert summary["finish_reason"] == "length" and summary["completion_tokens"] == 5
    assert summary["text"] == "".join(line["text"] for line in lines[:-1])


def test_chat_and_seeded_sampling_repeat(tiny_artifact, capsys):
    args = ["--artifact", str(tiny_artifact), "--json", "--chat", "--max-tokens", "6", "--ignore-eos"]
    args += ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "Hello"]
    first = _generate(capsys, *args)[1]
    assert _generate(capsys, *args)[1].splitlines()[:-1] == first.splitlines()[:-1]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-tokens", "4", ""], "prompt: empty"),
        (["--max-tokens", "4", "word " * 300], "exceeds the context"),
        (["--max-tokens", "0", "Hi"], "max_tokens"),
        (["--top-p", "2", "Hi"], "top_p"),
    ],
)
def test_bad_requests(tiny_artifact, capsys, args, needle):
    code, _, err = _generate(capsys, "--artifact", str(tiny_artifact), *args)
    assert code == 2 and needle in err and err.count("\n") == 1


def test_corrupted_truncated_or_missing_artifact(tiny_artifact, tmp_path, capsys):
    broken = shutil.copytree(tiny_artifact, tmp_path / "broken")
    data = bytearray((broken / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.onnx.data").write_bytes(bytes(data))
    code, _, err = _generate(capsys, "--artifact", str(broken), "Hi")
    assert code == 2 and "model.onnx.data: sha256 does not match" in err
    (broken / "model.onnx.data").write_bytes(bytes(data[:100]))
    code, _, err = _generate(capsys, "--artifact", str(broken), "Hi")
    assert code == 2 and "truncated" in err
    code, _, err = _generate(capsys, "--artifact", str(tmp_path / "nothing"), "Hi")
    assert code == 2 and "export-model" in err
