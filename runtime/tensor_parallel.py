"""Tensor parallelism with tiling-AllReduce (FastAttention's multi-NPU technique) over torch.distributed.

    torchrun --nproc-per-node 2 -m runtime.tensor_parallel --config node.yaml --prompt "Hello" --max-tokens 16

Megatron-style split of `exporters.model.Llama`, one shard per rank:

- attention: each rank owns a contiguous range of KV heads and the query heads that read them (with more
  ranks than KV heads, each KV head is replicated on num_ranks / num_kv_heads ranks, each owning part of
  its query heads); q/k/v weights are cut by rows, the output projection by columns, so each rank's o
  projection is a partial sum; its KV pool holds only its heads.
- MLP: gate/up cut by rows (intermediate units), down by columns: again a partial sum.
- embedding, norms and the LM head are replicated (every rank computes the logits; rank 0 uses them).

Tiling-AllReduce (`TiledAllReduce`): a row-parallel block's rows (tokens) are cut into `chunks`; chunk c's
partial sum goes out as an asynchronous all-reduce while chunk c + 1 computes, and the results are joined
once all have landed. chunks = 1 is the plain all-reduce after the whole block. Summation order per element
is the same either way, so both give identical numbers. A chunk is at least `min_chunk_rows` rows
(MIN_CHUNK_ROWS = 1024 when serving): every chunk re-reads the block's weights, and on 2 x H100 over NVLink
(benchmarks/results/tensor_parallel_gpu.json, CUDA-graph steps of a Llama-7B-shaped stack) row chunks made a
16-row decode step 1.25x (2 chunks) to 1.74x (4) slower than the plain all-reduce, and a 2048-token prefill
equal (2 chunks of 1024) to 1.05x slower (4 of 512); so decode steps use the plain all-reduce.

Serving: the engine runs on rank 0 only. `TorchBackend` with `tensor_parallel: N` shards its module
(`TensorParallel.shard`) and, on rank 0, broadcasts each step's inputs over a gloo group before running
it; ranks 1.. build the same backend and `follow` (receive a step, run it, discard the logits) until
rank 0 sends stop. The collectives run on the default group: gloo on the CPU, NCCL on CUDA (one GPU per
rank, by LOCAL_RANK). Not supported under TP: KV export/import (prefill/decode handoff), CUDA graphs.

Entry points: this module's `main` (the command above: rank 0 generates for the given prompts and prints
JSON lines), and the gRPC decode service (`torchrun --nproc-per-node N -m services.decode --config ...`:
rank 0 serves, the others `follow_from_artifact`, and rank 0 calls `stop_followers()` after its drain).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from exporters.model import MLP, FusedLinear, Linear, Llama

log = logging.getLogger(__name__)

MIN_CHUNK_ROWS = 1024  # rows (tokens) per all-reduce chunk at least (module docstring: measured on 2 x H100)


def head_split(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[range, range]:
    """(query heads, KV heads) of `rank`; query head h reads KV head h // (num_heads // num_kv_heads)."""
    group = num_heads // num_kv_heads
    if num_kv_heads % world == 0:
        kv_per_rank = num_kv_heads // world
        kv = range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
        return range(kv.start * group, kv.stop * group), kv
    if world % num_kv_heads or num_heads % world:
        raise ValueError(
            f"{world} ranks cannot split {num_heads} query / {num_kv_heads} KV heads: the rank count must "
            "divide the KV heads, or be a multiple of them that divides the query heads"
        )
    q_per_rank = num_heads // world
    q = range(rank * q_per_rank, (rank + 1) * q_per_rank)
    kv_head = q.start // group
    return q, range(kv_head, kv_head + 1)


class TiledAllReduce(nn.Module):
    """A row-parallel block (its output is this rank's partial sum), summed over ranks in row chunks."""

    def __init__(self, inner: nn.Module, group, chunks: int, min_chunk_rows: int = MIN_CHUNK_ROWS) -> None:
        super().__init__()
        self.inner, self.group, self.chunks, self.min_chunk_rows = inner, group, chunks, min_chunk_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = max(1, min(self.chunks, rows.shape[0] // self.min_chunk_rows))
        outputs, pending = [], []
        for part in rows.tensor_split(n):  # chunk c + 1 computes while chunk c is being reduced
            y = self.inner(part)
            pending.append(dist.all_reduce(y, group=self.group, async_op=True))
            outputs.append(y)
        for work in pending:
            work.wait()
        return torch.cat(outputs).view(*x.shape[:-1], -1)


def _dense(linear: Linear) -> torch.Tensor:
    if linear.quantized:
        raise ValueError("tensor parallelism needs dense weights (the torch backend dequantizes them)")
    return linear.weight.detach()


def _fused_weights(fused: FusedLinear) -> list[torch.Tensor]:
    if len(fused.parts) == 1:
        return list(_dense(fused.parts[0]).split(fused.sizes, dim=0))
    return [_dense(part) for part in fused.parts]


def shard_llama(
    model: Llama, rank: int, world: int, group=None, chunks: int = 4, min_chunk_rows: int = MIN_CHUNK_ROWS
) -> Llama:
    """Cut `model` (dense weights, on any device) to rank's shard, in place (module docstring)."""
    config = model.config
    D = config.head_dim
    if config.intermediate_size % world:
        raise ValueError(f"intermediate_size {config.intermediate_size} is not a multiple of {world} ranks")
    q_heads, kv_heads = head_split(config.num_heads, config.num_kv_heads, world, rank)
    q_rows, kv_rows = slice(q_heads.start * D, q_heads.stop * D), slice(kv_heads.start * D, kv_heads.stop * D)
    ffn = config.intermediate_size // world
    units = slice(rank * ffn, (rank + 1) * ffn)
    numpy = lambda t: t.float().cpu().numpy()  # noqa: E731 (Linear takes numpy; cast back below)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        dtype, device = attn.o.weight.dtype, attn.o.weight.device
        q, k, v = _fused_weights(attn.qkv)
        attn.qkv = FusedLinear([numpy(q[q_rows]), numpy(k[kv_rows]), numpy(v[kv_rows])], dtype, 0).to(device)
        o = Linear(numpy(_dense(attn.o)[:, q_rows]), dtype, 0).to(device)
        attn.o = TiledAllReduce(o, group, chunks, min_chunk_rows)
        attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
        gate, up = _fused_weights(mlp.gate_up)
        weights = dict(gate=numpy(gate[units]), up=numpy(up[units]), down=numpy(_dense(mlp.down)[:, units]))
        layer.mlp = TiledAllReduce(MLP(weights, dtype, 0).to(device), group, chunks, min_chunk_rows)
    return model


# -- serving: rank 0 drives, the others follow -------------------------------------------------------


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group and the channel that carries step inputs."""

    rank: int
    world: int
    chunks: int
    control: object  # a gloo group: step inputs travel as pickled objects over the CPU

    @classmethod
    def current(cls, world: int, chunks: int) -> TensorParallel:
        """The group set up by `init_from_env` (or by a test); its size must be `world`."""
        if not dist.is_initialized() or dist.get_world_size() != world:
            size = dist.get_world_size() if dist.is_initialized() else 1
            raise RuntimeError(
                f"tensor_parallel: {world}, but this process group has {size} ranks; launch with "
                f"torchrun --nproc-per-node {world}"
            )
        return cls(dist.get_rank(), world, chunks, _control_group())

    def shard(self, model: Llama) -> Llama:
        return shard_llama(model, self.rank, self.world, None, self.chunks)

    def send_step(self, batch) -> None:
        """Rank 0: hand a StepBatch to the followers (before running it)."""
        dist.broadcast_object_list([("step", batch)], src=0, group=self.control)

    def stop_followers(self) -> None:
        dist.broadcast_object_list([("stop", None)], src=0, group=self.control)

    def follow(self, backend) -> int:
        """Ranks 1..: run every step rank 0 sends until it says stop; returns the number of steps."""
        steps = 0
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=self.control)
            kind, batch = message[0]
            if kind == "stop":
                return steps
            backend.run(batch)
            steps += 1


_CONTROL = {}


def _control_group():
    if "group" not in _CONTROL:
        gloo = dist.get_backend() == "gloo"
        _CONTROL["group"] = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
    return _CONTROL["group"]


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """Join the torchrun group from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK):
    NCCL with one GPU per rank when CUDA is used, else gloo. Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return dist.get_rank(), world


def follow_from_artifact(artifact_path, config) -> int:
    """Ranks 1..: build the same sharded backend as rank 0's engine and follow its steps."""
    from runtime.artifact import load_artifact
    from runtime.backends.torch_cuda import TorchBackend
    from runtime.engine import DEFAULT_KV_CACHE_BYTES
    from runtime.kv_cache import layout_for_budget

    artifact = load_artifact(artifact_path)
    budget = config.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
    layout = layout_for_budget(budget, config.block_size, artifact.kv_bytes_per_token)  # as Engine does
    backend = TorchBackend(artifact, config, layout)
    return backend.tensor_parallel.follow(backend)


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point (module docstring): rank 0 generates, the others follow."""
    from runtime.config import config_from_dict, read_yaml
    from runtime.engine import Engine
    from runtime.sampling import SamplingParams

    parser = argparse.ArgumentParser(description="generate with a model sharded over torchrun's ranks")
    parser.add_argument("--config", required=True, help="node YAML: `artifact:` and a `runtime:` section")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    node = read_yaml(args.config)
    config = config_from_dict(node.get("runtime") or {}, args.config)
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK', 0)} %(message)s")
    rank, _ = init_from_env(config.device)
    if rank != 0:
        follow_from_artifact(node["artifact"], config)
        return
    engine = Engine.from_artifact(node["artifact"], config)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        for prompt in args.prompt:
            ids = [e.token_id for e in engine.generate(engine.tokenizer.encode(prompt), params)]
            line = dict(prompt=prompt, token_ids=ids, text=engine.tokenizer.decode(ids))
            print(json.dumps(line), flush=True)
    finally:
        engine.backend.tensor_parallel.stop_followers()


if __name__ == "__main__":
    main()
