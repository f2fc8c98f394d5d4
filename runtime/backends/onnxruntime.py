"""ONNX Runtime backend: one session over the artifact's graph and the paged KV pool it updates.

The pool is one zero-initialised array per layer for K and for V, wrapped as OrtValues and bound
with IO binding as both the graph's cache input and its cache output, so every step updates it in
place (our kernel writes straight into it; the function-body fallback copies through it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.artifact import Artifact
from runtime.config import RuntimeConfig
from runtime.errors import ConfigError
from runtime.kv_cache import KVCacheLayout

log = logging.getLogger(__name__)
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class StepBatch:
    """The graph's non-cache inputs for one step (see kernels/reference.py for their meaning)."""

    input_ids: np.ndarray  # [B, S] int64
    position_ids: np.ndarray  # [B, S] int64
    slot_mapping: np.ndarray  # [B, S] int64
    block_table: np.ndarray  # [B, max_blocks] int32
    past_lens: np.ndarray  # [B] int32
    total_lens: np.ndarray  # [B] int32
    logit_positions: np.ndarray  # [B, L] int64

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def session_options(config: RuntimeConfig) -> tuple[ort.SessionOptions, str]:
    """Session options with our attention kernel registered when the config allows; returns its name."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.num_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    kernel = "function"
    if config.attention_kernel in ("auto", "native"):
        from kernels import attention_cpu

        if attention_cpu.register(options):
            kernel = "native"
        elif config.attention_kernel == "native":
            raise ConfigError(
                "attention_kernel: native, but the CPU kernel library is not built; run "
                "`python -m kernels.attention_cpu build` or set attention_kernel: function"
            )
    return options, kernel


class OrtBackend:
    """Runs StepBatches through the artifact's graph over a KV pool of `layout`."""

    def __init__(self, artifact: Artifact, config: RuntimeConfig, layout: KVCacheLayout) -> None:
        options, self.attention_kernel = session_options(config)
        self.session = ort.InferenceSession(
            str(artifact.model_file), options, providers=["CPUExecutionProvider"]
        )
        log.info(
            "loaded %s: attention kernel %s, %d threads, KV pool %d blocks x %d tokens (%.1f MiB)",
            artifact.path,
            self.attention_kernel,
            options.intra_op_num_threads,
            layout.num_blocks,
            layout.block_size,
            layout.total_bytes / 2**20,
        )
        self.layout = layout
        width = artifact.model.num_kv_heads * artifact.model.head_dim
        dtype = NUMPY_DTYPES[artifact.kv_format]
        self._cache_arrays = []  # the memory: np.zeros maps pages lazily, so unused blocks cost no RSS
        self._cache_bindings = []  # (input name, output name, OrtValue)
        for layer in range(artifact.model.num_layers):
            for kind in ("k", "v"):
                array = np.zeros((layout.num_blocks, layout.block_size, width), dtype)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._cache_arrays.append(array)
                self._cache_bindings.append((f"{kind}_cache.{layer}", f"{kind}_cache.{layer}.out", value))

    def run(self, batch: StepBatch) -> np.ndarray:
        """One forward step; returns logits [B, L, V] float32 and leaves the pool updated."""
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for name, array in batch.feeds().items():
            binding.bind_cpu_input(name, array)
        for name_in, name_out, value in self._cache_bindings:
            binding.bind_ortvalue_input(name_in, value)
            binding.bind_ortvalue_output(name_out, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        """The pool's arrays (K and V per layer, in graph order); for tests and KV transfer."""
        return self._cache_arrays
