"""ONNX Runtime backend: one session over the artifact's graph and the paged KV pool it updates.

The pool is one zero-initialised array per layer for each of the format's pool tensors (K and V;
their scales; SAQ's records and slots: runtime.kv_cache.PoolTensor.shape), wrapped as OrtValues and
bound with IO binding as both the graph's cache input and its cache output, so every step updates it
in place (our kernel writes straight into it; the function-body fallback copies through it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from runtime.artifact import Artifact
from runtime.config import RuntimeConfig
from runtime.errors import ArtifactError, ConfigError
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
    seq_slots: np.ndarray | None = None  # [B] int32: each row's KV slot (SAQ graphs; padding rows 0)

    def feeds(self, seq_slots: bool = False) -> dict[str, np.ndarray]:
        """The inputs by graph name; seq_slots only when asked (graphs of formats without slots lack it)."""
        feeds = dict(self.__dict__)
        if not seq_slots or feeds["seq_slots"] is None:
            del feeds["seq_slots"]
        return feeds


ORT_ERRORS = (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument, ort_state.NotImplemented)


def session_options(config: RuntimeConfig, kernel: str) -> ort.SessionOptions:
    """Session options; with kernel "native" our attention library is registered (it must be built)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.num_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if kernel == "native":
        from kernels import attention_cpu

        if not attention_cpu.register(options):
            raise ConfigError(
                "attention_kernel: native, but the CPU kernel library is not built; run "
                "`python -m kernels.attention_cpu build` or set attention_kernel: function"
            )
    return options


def create_session(
    artifact: Artifact, config: RuntimeConfig
) -> tuple[ort.InferenceSession, ort.SessionOptions, str]:
    """The session over the artifact's graph and the attention kernel it runs ("native" or "function").

    With attention_kernel auto, our kernel is used when it is built and has a variant for the
    artifact's types; otherwise the function body runs, and the log says why.
    """
    from kernels import attention_cpu

    if config.attention_kernel == "auto":
        candidates = ["native", "function"] if attention_cpu.library_path() else ["function"]
    else:
        candidates = [config.attention_kernel]
    for kernel in candidates:
        options = session_options(config, kernel)
        try:
            session = ort.InferenceSession(
                str(artifact.model_file), options, providers=["CPUExecutionProvider"]
            )
            return session, options, kernel
        except ORT_ERRORS as e:
            if kernel != candidates[-1]:
                log.warning(
                    "the native attention kernel cannot run %s (%s); using the function body",
                    artifact.path,
                    e,
                )
                continue
            raise ArtifactError(f"{artifact.model_file}: ONNX Runtime cannot load it ({e})") from e
    raise AssertionError("unreachable")


class OrtBackend:
    """Runs StepBatches through the artifact's graph over a KV pool of `layout`."""

    def __init__(self, artifact: Artifact, config: RuntimeConfig, layout: KVCacheLayout) -> None:
        self.session, options, self.attention_kernel = create_session(artifact, config)
        log.info(
            "loaded %s: attention kernel %s, %d threads, KV pool %d blocks x %d tokens, %d slots (%.1f MiB)",
            artifact.path,
            self.attention_kernel,
            options.intra_op_num_threads,
            layout.num_blocks,
            layout.block_size,
            layout.num_slots,
            layout.total_bytes / 2**20,
        )
        self.layout = layout
        self._seq_slots = any(i.name == "seq_slots" for i in self.session.get_inputs())
        self._cache_arrays = []  # the memory: np.zeros maps pages lazily, so unused blocks cost no RSS
        self._cache_bindings = []  # (input name, output name, OrtValue)
        for layer in range(artifact.model.num_layers):
            for tensor in artifact.pool_tensors():  # K, V (+ scales); SAQ: records per block, slots
                array = np.zeros(tensor.shape(layout), tensor.dtype)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                name = f"{tensor.name}.{layer}"
                self._cache_arrays.append(array)
                self._cache_bindings.append((name, f"{name}.out", value))

    def run(self, batch: StepBatch) -> np.ndarray:
        """One forward step; returns logits [B, L, V] float32 and leaves the pool updated."""
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for name, array in batch.feeds(seq_slots=self._seq_slots).items():
            binding.bind_cpu_input(name, array)
        for name_in, name_out, value in self._cache_bindings:
            binding.bind_ortvalue_input(name_in, value)
            binding.bind_ortvalue_output(name_out, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def cache_arrays(self) -> list[np.ndarray]:
        """The pool's arrays in graph order: per layer, artifact.pool_tensors(); for KV transfer."""
        return self._cache_arrays
