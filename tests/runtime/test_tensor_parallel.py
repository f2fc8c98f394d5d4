"""Tensor parallelism with tiling-AllReduce (runtime/tensor_parallel.py) on local gloo groups.

The 1-rank model is the spec: a random small Llama (8 query / 2 KV heads) sharded over 2 and 4 spawned
ranks gives the same logits over a batched prefill and decode steps (<= 1e-5, fp32), with the all-reduce
in chunks and plain; 4 ranks replicate each KV head on 2 ranks. Then the serving path: an Engine on rank
0 over the tiny artifact with `tensor_parallel: 2`, rank 1 following its broadcast steps, gives the same
greedy tokens as a single-process torch engine. Each group runs in spawned processes, bounded by a timeout.
"""

from __future__ import annotations

import ast

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import Engine
from runtime.errors import ConfigError
from runtime.sampling import SamplingParams
from runtime.tensor_parallel import head_split
from tests.distributed import random_llama, run_ranks, serving_steps


def test_head_split_covers_every_head_once():
    for heads, kv_heads, world in [(8, 2, 2), (8, 2, 4), (8, 2, 8), (9, 3, 3), (32, 8, 4)]:
        splits = [head_split(heads, kv_heads, world, r) for r in range(world)]
        assert [h for q, _ in splits for h in q] == list(range(heads))
        for q, kv in splits:  # every query head's KV head is on its rank
            assert {h // (heads // kv_heads) for h in q} <= set(kv)
    with pytest.raises(ValueError, match="cannot split"):
        head_split(9, 3, 2, 0)


@pytest.fixture(scope="module")
def one_rank_logits() -> torch.Tensor:
    return serving_steps(random_llama())


@pytest.mark.parametrize(("world", "chunks"), [(2, 3), (2, 1), (4, 2)], ids=["2-tiled", "2-plain", "4-tiled"])
def test_sharded_logits_equal_one_rank(tmp_path, one_rank_logits, world, chunks):
    from tests.distributed import sharded_logits

    out = tmp_path / "logits.pt"
    run_ranks(world, sharded_logits, chunks, str(out), timeout_s=120)
    got = torch.load(out)
    error = float((got - one_rank_logits).abs().max())
    assert error <= 1e-5, f"{world} ranks, {chunks} chunks: max |logit diff| {error:.2e}"


def test_engine_on_two_ranks_gives_single_process_tokens(tmp_path, tiny_artifact):
    from tests.distributed import engine_tokens

    config = dict(backend="torch", device="cpu", max_batch_size=2, block_size=4, kv_cache_bytes=2**20)
    single = Engine.from_artifact(tiny_artifact, RuntimeConfig(**config), verify=False)
    prompts = [single.tokenizer.encode(p) for p in ("Hello there", "The quick brown fox jumps")]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [[e.token_id for e in single.generate(ids, params)] for ids in prompts]
    out = tmp_path / "tokens.txt"
    sharded = dict(config, tensor_parallel=2, allreduce_chunks=2)
    run_ranks(2, engine_tokens, str(tiny_artifact), sharded, prompts, str(out), timeout_s=180)
    assert ast.literal_eval(out.read_text()) == expected


def test_tensor_parallel_config_checks():
    with pytest.raises(ConfigError, match="need backend: torch"):
        RuntimeConfig(tensor_parallel=2)
    with pytest.raises(ConfigError, match="allreduce_chunks"):
        RuntimeConfig(backend="torch", allreduce_chunks=0)


def test_all_reduce_chunks_are_at_least_min_chunk_rows(monkeypatch):
    """Decode steps (few rows) get the plain all-reduce; a 2048-token prefill with chunks 4 gets 2 of 1024."""
    import runtime.tensor_parallel as tp

    reduced = []

    class Done:
        def wait(self) -> None:
            pass

    monkeypatch.setattr(
        tp.dist, "all_reduce", lambda y, group, async_op: reduced.append(y.shape[0]) or Done()
    )
    block = tp.TiledAllReduce(torch.nn.Identity(), None, chunks=4)
    for rows in (1, 16, 2048, 4096):
        reduced.clear()
        x = torch.randn(1, rows, 8)
        assert torch.equal(block(x), x)
        assert reduced == {1: [1], 16: [16], 2048: [1024, 1024], 4096: [1024] * 4}[rows]
