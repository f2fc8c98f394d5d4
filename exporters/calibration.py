"""Calibration for quantized KV: the per-channel mean of each layer's K, measured on text.

Text comes from the docstrings of standard-library modules, assembled at run time (nothing is
downloaded or stored). CALIBRATION_MODULES and the evaluation modules of the accuracy harness
(tests/benchmarks) are disjoint, so a format is never scored on the text it was calibrated on.
"""

from __future__ import annotations

import importlib
import pydoc

import torch

CALIBRATION_MODULES = ("collections", "functools", "itertools", "pathlib", "string", "textwrap")
CALIBRATION_TOKENS = 512


def stdlib_text(modules: tuple[str, ...]) -> str:
    """The docstrings of `modules` and their public members, in a fixed order."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(pydoc.getdoc(module))
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                doc = pydoc.getdoc(getattr(module, attr))
                if doc and doc not in parts:
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def calibration_ids(tokenizer_json: str, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    return tokenizer.encode(stdlib_text(CALIBRATION_MODULES), add_special_tokens=False).ids[:tokens]


@torch.no_grad()
def calibrate_k_means(model, ids: list[int]) -> None:
    """Set every layer's `attn.k_mean` to the mean over `ids` of its K after RoPE (per channel)."""
    means = {}

    def capture(index):
        def hook(module, args, output):
            means[index] = output[1].float().mean(dim=(0, 1))  # project() -> (q, k, v); k [B, S, W]

        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        original = attn.project
        handles.append((attn, original))
        attn.project = _wrap(original, capture(i), attn)
    try:
        model.forward_dense(torch.tensor([ids]))
    finally:
        for attn, original in handles:
            attn.project = original
    for i, layer in enumerate(model.layers):
        layer.attn.k_mean.copy_(means[i].to(layer.attn.k_mean.dtype))


def _wrap(project, hook, module):
    def wrapped(x, rope):
        output = project(x, rope)
        hook(module, (x, rope), output)
        return output

    return wrapped
