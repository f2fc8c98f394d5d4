"""Tensor-parallel decoder layers with tiling-AllReduce: overlapped vs plain all-reduce, scaling vs 1 device.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel_gpu \
      --out benchmarks/results/tensor_parallel_gpu.json
    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel_gpu --device cpu \
      --out benchmarks/results/tensor_parallel_cpu.json          # gloo on the CPU, a smaller stack

The model is `exporters.model.Llama` with random weights (fixed seed, the same on every rank), sharded by
`runtime.tensor_parallel.shard_llama`: each rank owns num_heads / world heads and intermediate / world MLP
units; the output projection and the MLP's down projection end in `TiledAllReduce`. GPU: a Llama-7B-shaped
stack (4 layers, hidden 4096, 32 heads of 128, MLP 11008, fp16), NCCL, attention by our Triton kernels over
the paged pool (runtime.backends.torch_cuda.TritonAttention). CPU: 2 layers, hidden 1024, 16 heads of 64,
MLP 2816, fp32, gloo, the vectorized spec attention, one thread per rank.

Shapes: decode steps (one new token per row over a past of `--past` tokens) at batch 1 and 16, and a
prefill of `--prefill` tokens (one row). For each shape: the step time (embedding, the layers, the LM head
over a 256-token vocabulary) with the all-reduce in 1 chunk (plain: one all-reduce after the projection),
2 and 4 row chunks (tiling-AllReduce: chunk c's all-reduce overlaps chunk c + 1's compute); the 1-device
step time of the unsharded model on rank 0's device (the other ranks wait) gives the scaling. Chunks split
the rows (tokens): a decode step at batch 1 has one row, so there every variant is the plain all-reduce.

Timing, two modes. eager: each step launched from Python, as the torch backend runs under tensor
parallelism today (it captures no CUDA graphs there); on these VMs a step is then bound by kernel launches.
graph (CUDA only): each variant's step captured once as a CUDA graph, all-reduces included, and replayed,
which shows the GPU time the launches hide. One run = `--steps` back-to-back steps between barriers, wall
time on rank 0 after a device sync, divided by the steps; variants interleaved run by run, `--repeats` runs
each, medians reported. The sharded prefill's logits are checked against the 1-device model's. Results
JSON: machine, versions, date, command.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from exporters.checkpoint import ModelConfig
from exporters.model import Llama
from runtime.tensor_parallel import TiledAllReduce, init_from_env, shard_llama

NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
SHAPES = dict(  # layers, hidden, MLP, heads, head_dim, dtype
    cuda=dict(layers=4, hidden=4096, ffn=11008, heads=32, head_dim=128, dtype=torch.float16),
    cpu=dict(layers=2, hidden=1024, ffn=2816, heads=16, head_dim=64, dtype=torch.float32),
)
VOCAB, BLOCK = 256, 16
CHUNKS = (1, 2, 4)


def random_model(shape: dict, seed: int = 0) -> Llama:
    """A Llama of `shape` with normal weights scaled by 1/sqrt(fan-in); the same on every rank."""
    hidden, ffn, heads, d = shape["hidden"], shape["ffn"], shape["heads"], shape["head_dim"]
    config = ModelConfig(
        "llama", shape["layers"], hidden, ffn, heads, heads, d, VOCAB, 1e4, 1e-5, 8192, False
    )
    g = torch.Generator().manual_seed(seed)

    def normal(n: int, k: int) -> np.ndarray:
        return (torch.randn(n, k, generator=g) * k**-0.5).numpy()

    weights = {
        "embed": normal(VOCAB, hidden),
        "lm_head": normal(VOCAB, hidden),
        "final_norm": np.ones(hidden, "f4"),
    }
    for i in range(shape["layers"]):
        p = f"layers.{i}."
        weights |= {p + n: normal(heads * d, hidden) for n in "qkv"}
        weights |= {p + "o": normal(hidden, heads * d), p + "down": normal(hidden, ffn)}
        weights |= {p + "gate": normal(ffn, hidden), p + "up": normal(ffn, hidden)}
        weights |= {p + "attn_norm": np.ones(hidden, "f4"), p + "mlp_norm": np.ones(hidden, "f4")}
    return Llama(config, weights, shape["dtype"]).eval()


def with_attention(model: Llama, device: torch.device) -> Llama:
    from runtime.backends.torch_cuda import TritonAttention, paged_attention_torch, use_attention

    return use_attention(
        model.to(device), TritonAttention() if device.type == "cuda" else paged_attention_torch
    )


def step_inputs(batch: int, past: int, new: int, width: int, model: Llama, device: torch.device):
    """(forward args without the pools, pools): rows of `past` cached tokens (random K/V) and `new` tokens."""
    blocks = -(-(past + new) // BLOCK)
    table = torch.arange(1, batch * blocks + 1, dtype=torch.int32).view(batch, blocks)  # block 0 unused
    pos = past + torch.arange(new).expand(batch, new)
    slots = table.long().gather(1, pos // BLOCK) * BLOCK + pos % BLOCK
    ids = torch.randint(0, VOCAB, (batch, new), generator=torch.Generator().manual_seed(batch + new))
    past_lens = torch.full((batch,), past, dtype=torch.int32)
    logit_pos = torch.full((batch, 1), new - 1)
    args = [ids, pos, slots, table, past_lens, past_lens + new, logit_pos]
    dtype = model.layers[0].mlp_norm.weight.dtype
    g = torch.Generator(device=device).manual_seed(7)
    pools = [
        torch.randn(batch * blocks + 1, BLOCK, width, device=device, dtype=dtype, generator=g)
        for _ in range(2 * len(model.layers))
    ]
    return [x.to(device) for x in args], pools


def local_kv_width(model: Llama) -> int:
    attn = model.layers[0].attn
    attn = getattr(attn, "inner", attn)
    return attn.num_kv_heads * attn.head_dim


def set_chunks(model: Llama, chunks: int) -> None:
    for module in model.modules():
        if isinstance(module, TiledAllReduce):
            module.chunks, module.min_chunk_rows = chunks, 1  # the chunk count as given, whatever the rows


def run_steps(step, steps: int, device: torch.device, group) -> float:
    """Seconds per step over `steps` back-to-back calls of `step`, started and ended by a barrier."""
    if group is not None:
        dist.barrier(group=group)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            step()
    sync(device)
    elapsed = time.perf_counter() - start
    if group is not None:
        dist.barrier(group=group)
    return elapsed / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def captured(model: Llama, args, pools, device: torch.device):
    """One step captured as a CUDA graph (collectives included); returns its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            model(*args, pools)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(*args, pools)
    return graph.replay


def step_functions(sharded, single, args, pools, single_args, single_pools, device, mode: str) -> dict:
    """name -> step callable: the sharded model per chunk count (every rank), one_device (rank 0)."""
    steps = {}
    for c in CHUNKS:
        set_chunks(sharded, c)
        if mode == "graph":
            steps[f"chunks_{c}"] = captured(sharded, args, pools, device)
        else:
            steps[f"chunks_{c}"] = lambda c=c: (set_chunks(sharded, c), sharded(*args, pools))
        dist.barrier()
    if single is not None:
        if mode == "graph":
            steps["one_device"] = captured(single, single_args, single_pools, device)
        else:
            steps["one_device"] = lambda: single(*single_args, single_pools)
    dist.barrier()
    return steps


def bench_shape(name, batch, past, new, sharded, single, device, options, mode: str) -> dict:
    """Every rank: the sharded model with each chunk count; rank 0 also the 1-device model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    args, pools = step_inputs(batch, past, new, local_kv_width(sharded), sharded, device)
    single_args = single_pools = None
    if single is not None:
        single_args, single_pools = step_inputs(batch, past, new, local_kv_width(single), single, device)
    row = dict(shape=name, mode=mode, batch=batch, past=past, new_tokens=new, world=world)
    row |= dict(steps=options.steps, repeats=options.repeats)
    try:
        steps = step_functions(sharded, single, args, pools, single_args, single_pools, device, mode)
    except RuntimeError as e:  # e.g. a collective that cannot be captured: keep the other rows
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps(row), flush=True)
        return row
    for c in CHUNKS:  # warm-up (Triton compiles, NCCL channels)
        run_steps(steps[f"chunks_{c}"], 2, device, dist.group.WORLD)
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(options.repeats):
        for c in CHUNKS:
            times[f"chunks_{c}"].append(
                run_steps(steps[f"chunks_{c}"], options.steps, device, dist.group.WORLD)
            )
        dist.barrier()
        if single is not None:  # rank 0 alone; the others wait at the barrier below
            run_steps(steps["one_device"], 1, device, None)
            times["one_device"].append(run_steps(steps["one_device"], options.steps, device, None))
        dist.barrier()
    for key, values in times.items():
        row[f"{key}_ms"] = 1e3 * statistics.median(values)
        row[f"{key}_ms_all"] = [round(1e3 * v, 4) for v in values]
    best = min(CHUNKS[1:], key=lambda c: row[f"chunks_{c}_ms"])
    row["best_tiled_chunks"] = best
    row["plain_over_best_tiled"] = row["chunks_1_ms"] / row[f"chunks_{best}_ms"]
    if single is not None:
        row["speedup_plain_vs_one_device"] = row["one_device_ms"] / row["chunks_1_ms"]
        row["speedup_best_vs_one_device"] = row["one_device_ms"] / min(row[f"chunks_{c}_ms"] for c in CHUNKS)
    if rank == 0:
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    return row


def logits_check(sharded, single, device, prefill: int) -> dict | None:
    """Max |logit difference| of the sharded prefill (chunks 4 and 1) vs the 1-device model's."""
    out = {}
    for c in (1, 4):
        set_chunks(sharded, c)
        args, pools = step_inputs(1, 0, prefill, local_kv_width(sharded), sharded, device)
        with torch.no_grad():
            got = sharded(*args, pools)[0]
        if single is not None:
            args, pools = step_inputs(1, 0, prefill, local_kv_width(single), single, device)
            with torch.no_grad():
                expected = single(*args, pools)[0]
            out[f"chunks_{c}_max_abs_logit_diff"] = float((got - expected).abs().max())
    if single is not None:
        out["logit_scale"] = float(expected.abs().max())
    return out or None


def machine(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), host_cpus=os.cpu_count())
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(device)
        info |= dict(device=f"{torch.cuda.device_count()} x {props.name}", triton=triton.__version__)
        info |= dict(
            nccl=".".join(map(str, torch.cuda.nccl.version())), capability=f"sm_{props.major}{props.minor}"
        )
        info["multicast_env"] = {k: os.environ.get(k) for k in NO_MULTICAST}
    else:
        cpu = platform.processor() or platform.machine()
        info |= dict(device=f"CPU ({cpu}), {torch.get_num_threads()} thread(s) per rank")
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]  # shared with other work
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tensor-parallel step time: tiled vs plain all-reduce")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--past", type=int, default=None, help="decode rows' cached tokens (cuda 1024, cpu 256)"
    )
    parser.add_argument("--prefill", type=int, default=None, help="prefill tokens (cuda 2048, cpu 512)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (cuda 20, cpu 3)")
    parser.add_argument("--layers", type=int, default=None, help="override the stack's layer count")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and any(os.environ.get(k) != v for k, v in NO_MULTICAST.items()):
        raise SystemExit(
            f"set {' '.join(f'{k}={v}' for k, v in NO_MULTICAST.items())} (NVLink multicast off)"
        )
    past = args.past or (1024 if cuda else 256)
    prefill = args.prefill or (2048 if cuda else 512)
    args.steps = args.steps or (20 if cuda else 3)
    if not cuda:
        torch.set_num_threads(1)
    rank, world = init_from_env(args.device)
    if world < 2:
        raise SystemExit(
            "launch with torchrun --nproc-per-node N, N >= 2 (the 1-device baseline runs on rank 0)"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = dict(SHAPES[args.device])
    shape["layers"] = args.layers or shape["layers"]
    full = random_model(shape)
    single = with_attention(copy.deepcopy(full), device) if rank == 0 else None
    sharded = with_attention(shard_llama(full, rank, world, chunks=1), device)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=f"torchrun --nproc-per-node {world} -m benchmarks.tensor_parallel_gpu "
        + " ".join(sys.argv[1:] if argv is None else argv),
        backend=dist.get_backend(),
        world=world,
        model={k: (str(v) if k == "dtype" else v) for k, v in shape.items()}
        | dict(vocab=VOCAB, block_size=BLOCK),
        note="4 GPUs are not lent in this workplace: only 2 ranks were run"
        if cuda
        else "shared 2-core machine",
        **machine(device),
    )
    result["prefill_logits_check"] = logits_check(sharded, single, device, prefill)
    result["rows"] = []
    modes = ("eager", "graph") if cuda else ("eager",)
    for mode in modes:
        for name, batch, new in (
            ("decode_b1", 1, 1),
            ("decode_b16", 16, 1),
            (f"prefill_{prefill}", 1, prefill),
        ):
            shape_past = past if new == 1 else 0
            row = bench_shape(name, batch, shape_past, new, sharded, single, device, args, mode)
            result["rows"].append(row)
            if rank == 0:
                with open(args.out, "w") as f:  # after each shape: a timeout keeps what was measured
                    json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
