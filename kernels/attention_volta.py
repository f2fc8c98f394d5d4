"""The Triton attention kernels with tiles for sm70-class cards (V100): FastAttention's Volta direction.

Same ops and contracts as ``kernels.attention_triton_prefill`` / ``kernels.attention_triton_decode``
(specs: ``kernels.reference``), under the limits of a Volta-class card:

- fp16 only (sm70 has no bf16): bf16 inputs raise ValueError.
- <= 96 KB of shared memory per block. ``VOLTA_PREFILL_CONFIGS`` / ``VOLTA_DECODE_CONFIGS`` keep the Q tile
  at 64 rows and K/V tiles at 32-64 keys, one stage (sm70 has no cp.async, so Triton's software pipelining
  has nothing to overlap). ``smem_upper_bound`` is a conservative static count of what a config can need
  (every tile and the fp32 score/accumulator layout conversions live at once); ``check_configs`` holds
  every config to SMEM_LIMIT_BYTES. ``python -m kernels.attention_volta --report PATH`` compiles each
  config for sm_70 with Triton's own compiler (no GPU needed) and records the shared memory it allocates;
  benchmarks/results/fastattention_volta_sm70.json holds that record.

Speed: current Triton has no Volta tensor-core path (MMAv1 was dropped in late 2024: dots fall back to
FMA below sm80), so on a V100 these kernels run on the FMA units. On the H100 the same tiles run with
Hopper's tensor cores; that timing (benchmarks/fastattention_gpu.py) is an emulation of the tiling
only and says nothing about V100 speed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kernels.attention_triton_decode import DecodeConfig
from kernels.attention_triton_prefill import PrefillConfig

SMEM_LIMIT_BYTES = 96 * 1024
# By padded head_dim. Chosen for sm70's limits (not tuned: no Volta card is lent); the sm70 compile
# record of 2026-12 (module docstring) gives their real shared-memory use.
VOLTA_PREFILL_CONFIGS = {64: PrefillConfig(64, 64, 4, 1), 128: PrefillConfig(64, 32, 4, 1)}
VOLTA_DECODE_CONFIGS = {64: DecodeConfig(32, 4, 1), 128: DecodeConfig(32, 4, 1)}
DECODE_MAX_ROWS = 64  # kernels.attention_triton_decode.MAX_ROWS_PER_PROGRAM: the decode Q tile's rows


def smem_upper_bound(block_m: int, block_n: int, block_d: int, num_stages: int) -> int:
    """Bytes of shared memory one program can need at most, fp16 tiles and fp32 accumulators.

    Q [M, D], K and V [N, D] per stage, P [M, N] in fp16, plus the larger of the fp32 layout conversions
    (scores [M, N] or the accumulator [M, D]). Triton reuses scratch, so the compiled figure is lower.
    """
    fp16, fp32 = 2, 4
    tiles = block_m * block_d + num_stages * 2 * block_n * block_d + block_m * block_n
    return fp16 * tiles + fp32 * max(block_m * block_n, block_m * block_d)


def check_configs() -> dict[str, int]:
    """Every Volta config's bound, keyed by name; raises ValueError if one is over SMEM_LIMIT_BYTES."""
    bounds = {}
    for d, c in VOLTA_PREFILL_CONFIGS.items():
        bounds[f"prefill_d{d}"] = smem_upper_bound(c.block_m, c.block_n, d, c.num_stages)
    for d, c in VOLTA_DECODE_CONFIGS.items():
        bounds[f"decode_d{d}"] = smem_upper_bound(DECODE_MAX_ROWS, c.block_n, d, c.num_stages)
    over = {name: b for name, b in bounds.items() if b > SMEM_LIMIT_BYTES}
    if over:
        raise ValueError(f"Volta configs over {SMEM_LIMIT_BYTES} bytes of shared memory: {over}")
    return bounds


# -- the ops: the Triton kernels with these tiles ----------------------------------------------------


def _padded(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def _require_fp16(**tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if x.dtype != torch.float16:
            raise ValueError(f"{name}.dtype must be float16 on Volta-class cards (no bf16), got {x.dtype}")


def flash_attention_prefill(q, k, v, **options):
    """``attention_triton_prefill.flash_attention_prefill`` with the Volta tiles (fp16 only)."""
    from kernels import attention_triton_prefill

    _require_fp16(q=q, k=k, v=v)
    config = VOLTA_PREFILL_CONFIGS[_padded(q.shape[-1])]
    return attention_triton_prefill.flash_attention_prefill(q, k, v, config=config, **options)


def flash_attention_decode(q, k_cache, v_cache, block_table, past_lens, total_lens, **options):
    """``attention_triton_decode.flash_attention_decode`` with the Volta tiles (fp16 only)."""
    from kernels import attention_triton_decode

    _require_fp16(q=q, k_cache=k_cache, v_cache=v_cache)
    config = VOLTA_DECODE_CONFIGS[_padded(q.shape[-1] // options["num_heads"])]
    return attention_triton_decode.flash_attention_decode(
        q, k_cache, v_cache, block_table, past_lens, total_lens, config=config, **options
    )


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    from kernels import attention_triton_decode

    attention_triton_decode.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q, k, v, k_cache, v_cache, block_table, slot_mapping, past_lens, total_lens,
    *, num_heads: int, num_kv_heads: int, scale: float, causal: bool = True, sliding_window: int = 0,
):  # fmt: skip
    """The FlashAttention node (paged_attention_ref) with the Volta tiles, pools updated in place."""
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    o = flash_attention_decode(
        q, k_cache, v_cache, block_table, past_lens, total_lens,
        num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, causal=causal,
        sliding_window=sliding_window,
    )  # fmt: skip
    return o, k_cache, v_cache


# -- the sm70 compile record ------------------------------------------------------------------------


def compiled_smem_bytes(kind: str, head_dim: int, capability: int = 70) -> int:
    """Shared memory Triton allocates for the Volta config of ``kind`` (prefill|decode), compiled for
    sm_<capability> with every feature on (window, ALiBi/varlen, LSE). Needs triton without the
    interpreter; no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import attention_triton_decode as dec
    from kernels import attention_triton_prefill as pre

    if kind == "prefill":
        c = VOLTA_PREFILL_CONFIGS[head_dim]
        fn, pointers = pre._flash_prefill_kernel, dict(Q="fp16", K="fp16", V="fp16", OUT="fp16")
        pointers |= dict(LSE="fp32", ALIBI="fp32", CU_Q="i32", CU_K="i32")
        constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=c.block_m, BLOCK_N=c.block_n)
        constants |= dict(CAUSAL=True, HAS_WINDOW=True, HAS_ALIBI=True, IS_VARLEN=True, RETURN_LSE=True)
    else:
        c = VOLTA_DECODE_CONFIGS[head_dim]
        fn, pointers = dec._decode_split_kernel, dict(Q="fp16", K_CACHE="fp16", V_CACHE="fp16", OUT="fp16")
        pointers |= dict(BLOCK_TABLE="i32", PAST_LENS="i32", TOTAL_LENS="i32")
        pointers |= dict(LSE="fp32", O_PART="fp32", M_PART="fp32", L_PART="fp32")
        constants = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=DECODE_MAX_ROWS,
                         BLOCK_N=c.block_n, PAGE_SIZE=16, CAUSAL=True, HAS_WINDOW=True, SPLIT=True,
                         RETURN_LSE=True)  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    indices = {(fn.arg_names.index(n),): value for n, value in constants.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=indices)
    options = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    return int(compiled.metadata.shared)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="compile the Volta configs for sm_70; record shared memory")
    parser.add_argument("--report", help="write the record as JSON here")
    args = parser.parse_args(argv)
    import datetime

    import triton

    bounds = check_configs()
    record = dict(
        date=datetime.date.today().isoformat(),
        triton=triton.__version__,
        target="cuda sm_70 (compiled on the CPU, no GPU)",
        limit_bytes=SMEM_LIMIT_BYTES,
        command="python -m kernels.attention_volta --report benchmarks/results/fastattention_volta_sm70.json",
        configs={},
    )
    for kind, table in (("prefill", VOLTA_PREFILL_CONFIGS), ("decode", VOLTA_DECODE_CONFIGS)):
        for d, config in table.items():
            shared = compiled_smem_bytes(kind, d)
            name = f"{kind}_d{d}"
            record["configs"][name] = dict(
                config=config.__dict__,
                compiled_shared_bytes=shared,
                upper_bound_bytes=bounds[name],
                fits=shared <= SMEM_LIMIT_BYTES,
            )
            print(name, record["configs"][name], flush=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(record, f, indent=1)
    if not all(c["fits"] for c in record["configs"].values()):
        sys.exit("a Volta config is over the 96 KB limit")


if __name__ == "__main__":
    main()
