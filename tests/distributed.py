"""Rank processes of the tensor-parallel tests and benchmark: a local gloo group of spawned processes.

`run_ranks(world, target, *args)` starts `world` spawned processes running `target(rank, world, *args)`
after joining a gloo group on a free local port, waits at most `timeout_s`, and fails with the ranks'
exit codes if one fails or hangs. Results travel through files the targets write.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, target, *args, timeout_s: float = 120.0) -> None:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [
        context.Process(target=_rank_main, args=(rank, world, port, target, args)) for rank in range(world)
    ]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout_s)
    alive = [p for p in ranks if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    codes = [p.exitcode for p in ranks]
    if alive or any(codes):
        raise RuntimeError(
            f"ranks of a {world}-rank group ended with {codes} ({len(alive)} killed after {timeout_s}s)"
        )


def _rank_main(rank: int, world: int, port: int, target, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
        dist.barrier()  # no rank tears its sockets down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in CI a rank that had finished its work aborted there
    # ("terminate called without an active exception", a gloo thread destroyed while joinable).
    os._exit(0)


# -- a small random Llama and a few serving steps -----------------------------------------------------


def random_llama(seed: int = 0, *, hidden: int = 64, ffn: int = 128, heads: int = 8, kv_heads: int = 2,
                 head_dim: int = 16, layers: int = 2, vocab: int = 512):  # fmt: skip
    from exporters.checkpoint import ModelConfig
    from exporters.model import Llama

    config = ModelConfig(
        "llama", layers, hidden, ffn, heads, kv_heads, head_dim, vocab, 1e4, 1e-5, 256, False
    )
    rng = np.random.default_rng(seed)
    shapes = dict(
        q=(heads * head_dim, hidden), k=(kv_heads * head_dim, hidden), v=(kv_heads * head_dim, hidden)
    )
    shapes |= dict(o=(hidden, heads * head_dim), gate=(ffn, hidden), up=(ffn, hidden), down=(hidden, ffn))
    weights = {"embed": rng.standard_normal((vocab, hidden), np.float32)}
    weights["lm_head"] = rng.standard_normal((vocab, hidden), np.float32) * hidden**-0.5
    weights["final_norm"] = 1 + 0.1 * rng.standard_normal(hidden, np.float32)
    for i in range(layers):
        for name, (n, k) in shapes.items():
            weights[f"layers.{i}.{name}"] = rng.standard_normal((n, k), np.float32) * k**-0.5
        for name in ("attn_norm", "mlp_norm"):
            weights[f"layers.{i}.{name}"] = 1 + 0.1 * rng.standard_normal(hidden, np.float32)
    return Llama(config, weights).eval()


def serving_steps(model, block_size: int = 4) -> torch.Tensor:
    """A batched prefill of rows of 7, 13 and 3 tokens (every position's logits), then 3 decode steps of
    the greedy tokens, over a paged pool sized for the model's (local) KV heads: logits concatenated."""
    from runtime.backends.torch_cuda import paged_attention_torch, use_attention

    use_attention(model, paged_attention_torch)
    attn = model.layers[0].attn.inner
    width = attn.num_kv_heads * attn.head_dim
    pools = [torch.zeros(32, block_size, width) for _ in range(2 * len(model.layers))]
    g = torch.Generator().manual_seed(1)
    lens = [7, 13, 3]
    tables = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 0, 0]], dtype=torch.int32)
    S = max(lens)
    ids = torch.randint(0, model.config.vocab_size, (3, S), generator=g)
    pos = torch.arange(S).expand(3, S)
    slots = tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    logit_positions = torch.minimum(pos, torch.tensor(lens)[:, None] - 1)
    past = torch.zeros(3, dtype=torch.int32)
    total = torch.tensor(lens, dtype=torch.int32)
    out = []
    with torch.no_grad():
        logits, _ = model(ids, pos, slots, tables, past, total, logit_positions, pools)
        out.append(logits.flatten(0, 1))
        last = logits[torch.arange(3), total.long() - 1]
        for _ in range(3):
            past = total.clone()
            total = total + 1
            p = past.long()[:, None]
            slots = tables.long().gather(1, p // block_size) * block_size + p % block_size
            logits, _ = model(last.argmax(-1, keepdim=True), p, slots, tables, past, total,
                              torch.zeros(3, 1, dtype=torch.long), pools)  # fmt: skip
            out.append(logits.flatten(0, 1))
            last = logits[:, 0]
    return torch.cat(out)


def sharded_logits(rank: int, world: int, chunks: int, out: str) -> None:
    from runtime.tensor_parallel import shard_llama

    model = shard_llama(random_llama(), rank, world, chunks=chunks, min_chunk_rows=1)  # chunk even 3 rows
    logits = serving_steps(model)
    if rank == 0:
        torch.save(logits, out)


def engine_tokens(rank: int, world: int, artifact: str, config_values: dict, prompts, out: str) -> None:
    from runtime.config import RuntimeConfig
    from runtime.engine import Engine
    from runtime.sampling import SamplingParams
    from runtime.tensor_parallel import follow_from_artifact

    config = RuntimeConfig(**config_values)
    if rank != 0:
        follow_from_artifact(artifact, config)
        return
    engine = Engine.from_artifact(artifact, config)
    try:
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        tokens = [[e.token_id for e in engine.generate(ids, params)] for ids in prompts]
    finally:
        engine.backend.tensor_parallel.stop_followers()
    Path(out).write_text(repr(tokens))
