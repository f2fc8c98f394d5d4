"""KV-cache storage formats: names and sizes only (no torch), shared by kernels, exporter and runtime.

The quantized formats' arithmetic is specified in kernels/kv_quant.py.
"""

from __future__ import annotations

KV_QUANT_FORMATS = {"int8": (8, 127), "int4": (4, 7)}  # format -> (bits, qmax)
INT4_GROUP = 32  # int4 scales cover 32 channels; int8 scales one head


def group_size(kv_format: str, head_dim: int) -> int:
    """Channels per scale."""
    return head_dim if kv_format == "int8" else INT4_GROUP


def code_width(kv_format: str, width: int) -> int:
    """Bytes of codes per token row of `width` channels."""
    return width if kv_format == "int8" else width // 2
