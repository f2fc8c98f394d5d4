"""`edge`: the command line of the stack.

    edge generate [--artifact DIR] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]
                  [--seed S] [--ignore-eos] [--stop STR ...] [--chat] [--json] PROMPT

`generate` runs the runtime in this process and streams the text; with `--json` it prints one JSON
object per token ({"index", "token_id", "text"}) and a final summary object. Errors print one line
saying what to change and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from runtime.errors import EdgeError

DEFAULT_ARTIFACT = Path("artifacts/smollm2-135m-instruct")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text in process from an artifact")
    p.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    p.add_argument(
        "--artifact",
        type=Path,
        default=DEFAULT_ARTIFACT,
        help=f"artifact directory (default {DEFAULT_ARTIFACT})",
    )
    p.add_argument("--config", type=Path, help="runtime YAML (the 'runtime' section is read)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--json", action="store_true", help="one JSON object per token, then a summary")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the artifact's files")


def _prompt_ids(engine, args) -> list[int]:
    if not args.prompt:
        raise EdgeError("prompt: empty; pass the text to continue")
    if not args.chat:
        return engine.tokenizer.encode(args.prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run_generate(args) -> int:
    from runtime.config import RuntimeConfig, load_config
    from runtime.engine import Engine
    from runtime.sampling import SamplingParams

    config = load_config(args.config) if args.config else RuntimeConfig()
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    engine = Engine.from_artifact(args.artifact, config, verify=not args.no_verify)
    ids = _prompt_ids(engine, args)
    start = time.perf_counter()
    first = None
    pieces, finish, count = [], None, 0
    for event in engine.generate(ids, params):
        first = first or time.perf_counter()
        count += 1
        pieces.append(event.text)
        finish = event.finish_reason
        if args.json:
            print(
                json.dumps({"index": event.index, "token_id": event.token_id, "text": event.text}), flush=True
            )
        else:
            print(event.text, end="", flush=True)
    end = time.perf_counter()
    summary = {
        "finish_reason": finish.value if finish else None,
        "prompt_tokens": len(ids),
        "completion_tokens": count,
        "text": "".join(pieces),
        "time_to_first_token_ms": round((first - start) * 1e3, 2),
        "decode_tokens_per_s": round((count - 1) / (end - first), 2) if count > 1 else None,
        "attention_kernel": engine.backend.attention_kernel,
    }
    print(json.dumps(summary) if args.json else "", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description="edge inference stack")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_generate(args)
    except EdgeError as e:
        print(f"edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
