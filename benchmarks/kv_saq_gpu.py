"""SAQ staircase decode on one GPU vs the fp16 split-KV decode kernel, same process, same K/V.

    python -m benchmarks.kv_saq_gpu [--quick] [--no-tune] [--spec SAQ] [--out PATH]

- **decode**: one query token per row, B in {1, 8}, N in {8k, 32k}, 32 query / 8 KV heads of 128 and
  9 / 3 heads of 64, fp16 q, SAQ format --spec (default SAQ_DEFAULT). Providers: ``fp16``
  (kernels/attention_triton_decode.py over an fp16 pool of 16-token blocks, shuffled block table) and
  ``saq`` (the read kernel of kernels/attention_triton_saq.py over the staircase the write path built
  from the same K/V: tokens 0..N-2 in the cache, token N-1 the step's new k/v, as the node sees it). The
  method of benchmarks/kv_quant_gpu.py: each call rotates over enough copies of the cache that the KV in
  flight is >= 4x the L2 size; time per call = the median over 15 replays of a CUDA graph of 20 calls, timed
  with CUDA events. GB/s counts what a call must read and write: fp16 K/V, or the records at their
  stairs' widths + the open stage's fp16 rows + the new k/v; q and o for both. Cosine: the SAQ o vs
  the fp16 kernel's o, flattened, and the least over (row, head).
- **write** (eager, no graph: the write path reads the lengths on the host): the node's whole step
  (read + tail write) at B=1 and B=8, and closing one stage (``close_stage``: the cascade, the
  clipping search and the top-stair encode), median of 20.
- ``--no-tune`` skips timing SAQ_CANDIDATES (B=1, N=32k, per head size) first.
Results go to benchmarks/results/kv_saq_gpu.json with the card, date, versions and command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kv_quant_gpu import (  # one timing method
    environment,
    graph_ms_per_call,
    guarded,
    median_event_ms,
)
from kernels.attention_triton_decode import flash_attention_decode
from kernels.attention_triton_saq import (
    SAQ_CANDIDATES,
    SAQ_DECODE_CONFIGS,
    close_stage,
    flash_attention_decode_saq,
    paged_attention_saq,
    write_kv_saq,
)
from kernels.kv_formats import SAQ_DEFAULT, SaqFormat
from kernels.kv_saq import _SlotView

RESULTS = Path(__file__).resolve().parent / "results" / "kv_saq_gpu.json"
HEADS = [(32, 8, 128), (9, 3, 64)]  # Hq, Hkv, D
BLOCK_SIZE = 16  # the fp16 pool's
BATCHES = [1, 8]
LENGTHS = [8192, 32768]
DEVICE = "cuda"


# ---------------------------------------------------------------- inputs


def saq_cache(k: torch.Tensor, v: torch.Tensor, fmt: SaqFormat) -> dict:
    """The staircase of each row's tokens k, v [B, T, W] (fp16), written by the node's write path."""
    batch, tokens, _ = k.shape
    stages = tokens // fmt.stage + 1
    pool = torch.zeros(batch * stages + 1, fmt.block_bytes, dtype=torch.uint8, device=DEVICE)
    slots = torch.zeros(batch + 1, fmt.slot_bytes, dtype=torch.uint8, device=DEVICE)
    table = (torch.randperm(batch * stages, device=DEVICE) + 1).int().view(batch, stages)
    seq_slots = torch.arange(1, batch + 1, dtype=torch.int32, device=DEVICE)
    zeros = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    write_kv_saq(k, v, pool, slots, table, zeros, zeros + tokens, seq_slots, fmt=fmt)
    return dict(pool=pool, slots=slots, table=table, seq_slots=seq_slots)


def decode_sets(heads, batch: int, length: int, fmt: SaqFormat, l2_bytes: int) -> tuple[list[dict], dict]:
    """Copies (distinct memory, same values) of: q, the fp16 pool + table, the SAQ cache + table, the new
    token's k/v. As many as keep >= 4x L2 of SAQ bytes in flight (the smaller format), at most 64."""
    num_heads, num_kv_heads, head_dim = heads
    width = num_kv_heads * head_dim
    blocks = batch * length // BLOCK_SIZE
    k_pool, v_pool = (
        torch.randn(blocks, BLOCK_SIZE, width, device=DEVICE, dtype=torch.float16) for _ in "kv"
    )
    fp16_table = torch.randperm(blocks, device=DEVICE).int().view(batch, -1)
    k_seq, v_seq = (p[fp16_table.long()].view(batch, length, width) for p in (k_pool, v_pool))
    cache = saq_cache(k_seq[:, :-1].contiguous(), v_seq[:, :-1].contiguous(), fmt)
    new = dict(k=k_seq[:, -1:].contiguous(), v=v_seq[:, -1:].contiguous())
    q = torch.randn(batch, 1, num_heads * head_dim, device=DEVICE, dtype=torch.float16)
    count = max(1, min(64, math.ceil(4 * l2_bytes / saq_bytes(batch, length, fmt))))
    tensors = dict(q=q, fp16_table=fp16_table, **cache, **new)
    sets = [
        dict(fp16=(k_pool.clone(), v_pool.clone()), **{name: x.clone() for name, x in tensors.items()})
        for _ in range(count)
    ]
    lens = torch.full((batch,), length, device=DEVICE, dtype=torch.int32)
    return sets, dict(total=lens, past=lens - 1, count=count)


def decode_call(s: dict, provider: str, heads, fmt: SaqFormat, meta: dict, config=None):
    num_heads, num_kv_heads, head_dim = heads
    common = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, causal=True, scale=head_dim**-0.5)
    if provider == "fp16":
        k, v = s["fp16"]
        return lambda: flash_attention_decode(
            s["q"], k, v, s["fp16_table"], meta["past"], meta["total"], **common
        )
    args = (
        s["q"],
        s["k"],
        s["v"],
        s["pool"],
        s["slots"],
        s["table"],
        meta["past"],
        meta["total"],
        s["seq_slots"],
    )
    return lambda: flash_attention_decode_saq(*args, fmt=fmt, config=config, **common)


# ---------------------------------------------------------------- bytes


def saq_bytes(batch: int, length: int, fmt: SaqFormat) -> int:
    """What the SAQ read moves for rows of `length` keys (cache: length - 1): records at their stairs'
    widths, the open stage's fp16 rows, the new k/v (q and o: see step_bytes)."""
    past = length - 1
    closed = past // fmt.stage
    records = 0
    for j in range(closed):
        stair = 0 if j < fmt.sink else fmt.stair_of_age(closed - 1 - j)
        records += fmt.record_bytes(fmt.stairs[stair][0])
    open_rows = past - closed * fmt.stage + 1
    return batch * (records + open_rows * 2 * fmt.width * 2)


def step_bytes(batch: int, length: int, provider: str, heads, fmt: SaqFormat) -> int:
    num_heads, num_kv_heads, head_dim = heads
    q_and_o = 2 * batch * num_heads * head_dim * 2
    if provider == "fp16":
        return batch * length * 2 * num_kv_heads * head_dim * 2 + q_and_o
    return saq_bytes(batch, length, fmt) + q_and_o


# ---------------------------------------------------------------- runs


def tune(heads, fmt: SaqFormat, l2_bytes: int) -> tuple:
    sets, meta = decode_sets(heads, 1, 32768, fmt, l2_bytes)
    timings = []
    for config in SAQ_CANDIDATES:
        try:
            timings.append(
                (graph_ms_per_call([decode_call(s, "saq", heads, fmt, meta, config) for s in sets]), config)
            )
        except Exception as e:  # a config that does not compile or fit is skipped
            print(f"tune {heads} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    ms, config = min(timings, key=lambda t: t[0])
    cells = {f"{c.block_n}/{c.num_warps}/{c.num_stages}": round(t * 1e3, 2) for t, c in timings}
    print(f"tune {heads}: best {config} {ms * 1e3:.1f} us {cells}", flush=True)
    del sets
    torch.cuda.empty_cache()
    return config, cells


def bench_decode(heads, batch: int, length: int, fmt: SaqFormat, config, l2_bytes: int) -> dict:
    sets, meta = decode_sets(heads, batch, length, fmt, l2_bytes)
    row = dict(heads=list(heads), batch=batch, length=length, copies=meta["count"])
    outputs = {}
    for provider in ("fp16", "saq"):
        calls = [decode_call(s, provider, heads, fmt, meta, config) for s in sets]
        outputs[provider] = calls[0]().float()
        ms = graph_ms_per_call(calls)
        row[f"{provider}_us"] = ms * 1e3
        row[f"{provider}_bytes"] = step_bytes(batch, length, provider, heads, fmt)
        row[f"{provider}_gb_s"] = row[f"{provider}_bytes"] / ms / 1e6
    row["saq_speedup"] = row["fp16_us"] / row["saq_us"]
    row["bytes_ratio"] = row["fp16_bytes"] / row["saq_bytes"]
    saq, fp16 = outputs["saq"], outputs["fp16"]
    row["cosine"] = F.cosine_similarity(saq.flatten(), fp16.flatten(), dim=0).item()
    head_dim = heads[2]
    per_head = F.cosine_similarity(saq.view(batch, -1, head_dim), fp16.view(batch, -1, head_dim), dim=-1)
    row["cosine_min_head"] = per_head.min().item()
    del sets
    torch.cuda.empty_cache()
    return row


def bench_write(heads, fmt: SaqFormat) -> dict:
    """Eager: the node's whole step (read + tail write, no stage closes) at B=1 and 8, N=8k; one close."""
    row = dict(heads=list(heads), length=8192)
    for batch in (1, 8):
        row.update(time_step(heads, fmt, batch))
    torch.cuda.empty_cache()
    return row


def time_step(heads, fmt: SaqFormat, batch: int) -> dict:
    num_heads, num_kv_heads, head_dim = heads
    node = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, scale=head_dim**-0.5, fmt=fmt)
    s = decode_sets(heads, batch, 8192, fmt, 0)[0][0]
    past = torch.full((batch,), 8190 - fmt.stage // 2, dtype=torch.int32)  # mid-stage: no close
    args = (s["q"], s["k"], s["v"], s["pool"], s["slots"], s["table"], past, past + 1, s["seq_slots"])
    dev_args = (*args[:6], past.to(DEVICE), past.to(DEVICE) + 1, args[8])
    row = {
        f"step_B{batch}_host_lens_us": median_event_ms(lambda: paged_attention_saq(*args, **node)) * 1e3,
        f"step_B{batch}_device_lens_us": median_event_ms(lambda: paged_attention_saq(*dev_args, **node))
        * 1e3,
    }
    if batch == 1:
        view = _SlotView(s["pool"], s["slots"], int(s["seq_slots"][0]), s["table"][0].cpu(), fmt)
        k, v = torch.randn(2, fmt.stage, fmt.width, device=DEVICE)
        closing = 8191 // fmt.stage  # the next stage to close: the cascade moves a stage on every stair
        row["close_stage_us"] = median_event_ms(lambda: close_stage(view, closing, k, v)) * 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tune", action="store_true", help="use SAQ_DECODE_CONFIGS as they are")
    parser.add_argument("--quick", action="store_true", help="N=8k only")
    parser.add_argument("--spec", default=SAQ_DEFAULT, help="SaqFormat.parse text")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = environment()
    results = dict(
        environment=env,
        spec=args.spec,
        command="python -m benchmarks.kv_saq_gpu " + " ".join(argv or sys.argv[1:]),
    )
    results.update(configs={}, tuning={}, decode=[], write=[])

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    for heads in HEADS:
        fmt = SaqFormat.parse(args.spec, heads[1] * heads[2])
        config = SAQ_DECODE_CONFIGS[heads[2]]
        if not args.no_tune:
            tuned = guarded(results, f"tune_{heads}", tune, heads, fmt, env["l2_bytes"])
            if tuned:
                config, results["tuning"][str(heads)] = tuned
        results["configs"][str(heads)] = vars(config)
        for batch in BATCHES:
            for length in LENGTHS[:1] if args.quick else LENGTHS:
                key = f"decode_{heads}_B{batch}_N{length}"
                row = guarded(results, key, bench_decode, heads, batch, length, fmt, config, env["l2_bytes"])
                if row:
                    results["decode"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
        row = guarded(results, f"write_{heads}", bench_write, heads, fmt)
        if row:
            results["write"].append(row)
            print(json.dumps(row), flush=True)
    save()
    print(f"wrote {args.out}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
