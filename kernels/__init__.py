"""Attention kernels and their fp32 specs.

- ``kernels.reference``: the fp32 specs every kernel is tested against (torch only).
- ``kernels.attention_cpu``: the native CPU kernel of the ONNX FlashAttention node (onnxruntime only).
- The Triton ops below, for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``). They are
  loaded on first use, so importing ``kernels`` or the two modules above never imports triton:
  ``flash_attention_prefill`` (FlashAttention-2 forward, dense or packed varlen),
  ``flash_attention_decode`` (split-KV decode over the paged pool), ``write_kv_cache`` and
  ``paged_attention`` (write + decode: the FlashAttention node's contract on the GPU).
"""

from __future__ import annotations

import importlib

_TRITON_OPS = {
    "flash_attention_prefill": "kernels.attention_triton_prefill",
    "flash_attention_decode": "kernels.attention_triton_decode",
    "write_kv_cache": "kernels.attention_triton_decode",
    "paged_attention": "kernels.attention_triton_decode",
}

__all__ = sorted(_TRITON_OPS)


def __getattr__(name: str):
    if name in _TRITON_OPS:
        return getattr(importlib.import_module(_TRITON_OPS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
