"""`edge`: the command line of the stack.

    edge generate [--artifact DIR] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]
                  [--seed S] [--ignore-eos] [--stop STR ...] [--chat] [--json] PROMPT

    edge client media merge FRAME... --out merged.png
    edge client media long-exposure FRAME... --out long.jpg [--trail-px 120] [--subject X,Y]
    edge client media animate IMAGE --click X,Y --prompt "flow right" --out loop.mp4

`generate` runs the runtime in this process and streams the text; with `--json` it prints one JSON
object per token ({"index", "token_id", "text"}) and a final summary object. `client media` sends
image files to the media service and writes what it returns. Errors print one line saying what to
change and exit with status 2.
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
    p = sub.add_parser("client", help="call a running gateway (or, with `media`, the media service)")
    p.add_argument("--address", help="host:port (default: gateway 127.0.0.1:50060, media 127.0.0.1:50064)")
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
    _add_media(calls)


IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".heic": "heic", ".heif": "heic"}
CLIP_SUFFIXES = {".mp4": "mp4", ".gif": "gif", ".apng": "apng", ".png": "apng", ".mkv": "ffv1"}


def _add_media(calls) -> None:
    m = calls.add_parser("media", help="burst merge, long exposure and region animation on files")
    jobs = m.add_subparsers(dest="media_call", required=True)
    merge = jobs.add_parser("merge", help="merge a burst into one denoised image")
    exposure = jobs.add_parser("long-exposure", help="a long-exposure photo from a burst")
    for q in (merge, exposure):
        q.add_argument("frames", nargs="+", type=Path, help="image files of the burst, in order")
        q.add_argument("--reference", type=int, help="index of the reference frame")
        q.add_argument("--format", choices=["png", "png16", "jpeg", "heic"], help="default: from --out")
        q.add_argument("--quality", type=int, default=0, help="JPEG/HEIC quality (default 92)")
    exposure.add_argument("--trail-px", type=float, default=0.0, help="trail length; 0 = every frame")
    exposure.add_argument("--subject", help="X,Y: panning mode, keep what moves with this point sharp")
    exposure.add_argument("--subject-mask", type=Path, help="panning mode: image file, nonzero = subject")
    a = jobs.add_parser("animate", help="a looping clip where only the clicked region moves")
    a.add_argument("image", type=Path)
    a.add_argument("--click", action="append", required=True, help="X,Y on the region (repeatable)")
    a.add_argument("--prompt", required=True, help="e.g. 'flow right', 'rise slowly', 'sway'")
    a.add_argument("--speed", type=float, default=0.0, help="px per frame (default: from the prompt)")
    a.add_argument("--frames", type=int, default=0, help="frames in the loop (default 24)")
    a.add_argument("--fps", type=float, default=0.0, help="default 12")
    a.add_argument("--format", choices=["mp4", "gif", "apng", "ffv1"], help="default: from --out")
    a.add_argument("--mask-out", type=Path, help="also write the region's mask (PNG) here")
    for q in (merge, exposure, a):
        q.add_argument("--out", type=Path, required=True, help="where to write the result")
        q.add_argument("--json", action="store_true", help="print the result's header as JSON")


def _point(text: str, flag: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise EdgeError(f"{flag}: {text!r} must be X,Y in pixels, e.g. 120,80") from None
    return x, y


def _output_format(args, suffixes: dict[str, str]) -> str:
    fmt = args.format or suffixes.get(args.out.suffix.lower())
    if fmt is None:
        raise EdgeError(f"--out: cannot tell the format from {args.out.name!r}; pass --format")
    return fmt


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise EdgeError(f"{path}: cannot read ({e.strerror})") from None


def run_media(args) -> int:
    import grpc

    from services.media.client import MediaClient

    with MediaClient(args.address or "127.0.0.1:50064", timeout=args.timeout) as media:
        try:
            if args.media_call == "animate":
                reply = media.animate_region(
                    _read(args.image),
                    [_point(c, "--click") for c in args.click],
                    args.prompt,
                    speed=args.speed,
                    num_frames=args.frames,
                    fps=args.fps,
                    format=_output_format(args, CLIP_SUFFIXES),
                )
            else:
                frames = [_read(p) for p in args.frames]
                settings = dict(reference=args.reference, format=_output_format(args, IMAGE_SUFFIXES))
                settings["quality"] = args.quality
                if args.media_call == "merge":
                    reply = media.merge_burst(frames, **settings)
                else:
                    reply = media.long_exposure(
                        frames,
                        trail_px=args.trail_px,
                        subject_point=_point(args.subject, "--subject") if args.subject else None,
                        subject_mask=_read(args.subject_mask) if args.subject_mask else b"",
                        **settings,
                    )
        except grpc.RpcError as e:
            print(f"edge client media: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    name = "clip" if args.media_call == "animate" else "image"
    args.out.write_bytes(reply.files[name])
    if getattr(args, "mask_out", None) and "mask" in reply.files:
        args.mask_out.write_bytes(reply.files["mask"])
    summary = {"out": str(args.out), "width": reply.width, "height": reply.height}
    summary.update(num_frames=reply.num_frames, stats=reply.stats)
    print(json.dumps(summary) if args.json else f"wrote {args.out} ({reply.width}x{reply.height})")
    return 0


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

    if args.call == "media":
        return run_media(args)
    with EdgeClient(args.address or "127.0.0.1:50060", timeout=args.timeout) as client:
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
