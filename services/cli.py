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
    _add_sampling(p)
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
    params = SamplingParams(**_sampling_settings(args))
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


def _add_sampling(p) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _sampling_settings(args) -> dict:
    """The sampling flags as keyword arguments of SamplingParams and of the client."""
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def _add_up_down(sub) -> None:
    p = sub.add_parser("up", help="start every service of this node as local processes")
    p.add_argument("--config", type=Path, help="node YAML (default: deploy/config/local.yaml)")
    sub.add_parser("down", help="stop the services started by `edge up` (graceful drain)")
    h = sub.add_parser("health", help="exit 0 if the service at ADDRESS is SERVING (container healthchecks)")
    h.add_argument("address", help="host:port")
    h.add_argument("--timeout", type=float, default=3.0)


def _add_client(sub) -> None:
    p = sub.add_parser("client", help="call a running gateway")
    p.add_argument("--address", default="127.0.0.1:50060", help="gateway host:port")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    calls = p.add_subparsers(dest="call", required=True)
    g = calls.add_parser("generate", help="continue a prompt")
    g.add_argument("prompt")
    c = calls.add_parser("chat", help="one user message through the chat template")
    c.add_argument("prompt")
    c.add_argument("--system", help="system message")
    for q in (g, c):
        _add_sampling(q)
        q.add_argument("--json", action="store_true", help="one JSON object per chunk, then a summary")
    calls.add_parser("models", help="list the models the gateway serves")


def run_up(args) -> int:
    from services import launcher

    config = args.config or Path("deploy/config/local.yaml")
    services = launcher.up(config if config.exists() else None)
    print("services are up (logs in .run/):")
    for service in services.values():
        print(f"  {service.name:10s} {service.address}")
    gateway = services["gateway"].address
    print(f'\ncall them:\n  .venv/bin/edge client --address {gateway} chat "What is the capital of France?"')
    print("  or from Python: services.client.EdgeClient(" + repr(gateway) + ")\nstop them: make down")
    return 0


def run_down(args) -> int:
    from services import launcher

    stopped = launcher.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def run_health(args) -> int:
    from services import launcher

    try:
        launcher.wait_serving(args.address, args.timeout)
    except TimeoutError as e:
        print(f"edge health: {e}", file=sys.stderr)
        return 1
    return 0


def run_client(args) -> int:
    import grpc

    from services.client import Completion, EdgeClient

    with EdgeClient(args.address, timeout=args.timeout) as client:
        if args.call == "models":
            for model in client.list_models():
                print(
                    f"{model.name}\tcontext {model.context_length}\tvocab {model.vocab_size}"
                    f"\tkv {model.kv_format}"
                )
            return 0
        settings = _sampling_settings(args)
        if args.call == "chat":
            system = [{"role": "system", "content": args.system}] if args.system else []
            stream = client.chat(system + [{"role": "user", "content": args.prompt}], **settings)
        else:
            stream = client.generate(args.prompt, **settings)
        completion = Completion()
        try:
            for chunk in stream:
                completion.add(chunk)
                if args.json:
                    print(json.dumps({"text": chunk.text, "token_ids": list(chunk.token_ids)}), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
        except grpc.RpcError as e:
            print(f"\nedge client: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        summary = {k: v for k, v in completion.__dict__.items() if k != "token_ids"}
        print(json.dumps(summary) if args.json else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge", description="edge inference stack")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_up_down(sub)
    _add_client(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {
        "generate": run_generate,
        "up": run_up,
        "down": run_down,
        "client": run_client,
        "health": run_health,
    }
    try:
        return commands[args.command](args)
    except (EdgeError, RuntimeError, TimeoutError) as e:
        print(f"edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
