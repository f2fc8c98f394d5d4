"""Build, find and register the native CPU kernels of the ``fastattention`` custom-op domain.

One library, two ops: ``FlashAttention`` (``kernels/csrc/fastattention_cpu.cc``; contract
``kernels.reference.paged_attention_ref``, and ``kernels.kv_quant`` for int8/int4 pools) and
``FlashAttentionSaq`` (``kernels/csrc/saq_cpu.cc``; contract ``kernels.kv_saq.paged_attention_saq_ref``).
Both include ``kernels/csrc/fastattention_cpu.h`` (numerics, micro-kernels, thread pool and ORT glue); the SAQ
op also includes ``kernels/csrc/saq_format.h`` (its byte layout and quantization). It is an ONNX Runtime
custom-op library for the CPU execution provider. Once ``register(session_options)`` has added it, the
FlashAttention nodes of a model run natively instead of through their ONNX function body, and
FlashAttentionSaq nodes (which have no body) can run at all.

Build it once per machine::

    python -m kernels.attention_cpu build

The build needs g++. The first build also needs npm: no PyPI wheel ships the ONNX Runtime C/C++
headers, so ``npm pack com.github.asus4.onnxruntime@0.4.9`` fetches them once. That package bundles
the official ORT 1.29 headers (MIT). Only the headers folder is extracted, into
``kernels/build/ort-headers/``. Nothing under ``kernels/build/`` is committed.

The library uses ``ORT_API_MANUAL_INIT``, does not link against libonnxruntime, and loads in
onnxruntime >= 1.29. It is compiled with ``-march=native``, so a .so built on one machine may not
run on another: build it where it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

KERNELS_DIR = Path(__file__).resolve().parent
SOURCES = [KERNELS_DIR / "csrc" / "fastattention_cpu.cc", KERNELS_DIR / "csrc" / "saq_cpu.cc"]
HEADERS = [KERNELS_DIR / "csrc" / "fastattention_cpu.h", KERNELS_DIR / "csrc" / "saq_format.h"]
BUILD_DIR = KERNELS_DIR / "build"
HEADERS_DIR = BUILD_DIR / "ort-headers"
LIBRARY = BUILD_DIR / "libfastattention_cpu.so"

NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
# Where the tarball keeps the headers: one slice of the iOS xcframework (every slice has the same ones).
TARBALL_HEADERS = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
CXXFLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden"]


class BuildError(RuntimeError):
    """The kernel library could not be built. The message says what is missing or what failed."""


def library_path() -> Path | None:
    """The built library, or None if it has not been built on this machine."""
    return LIBRARY if LIBRARY.is_file() else None


def register(session_options: ort.SessionOptions) -> bool:
    """Add the kernel library to `session_options` if it is built. Returns whether it was added."""
    path = library_path()
    if path is None:
        return False
    session_options.register_custom_ops_library(str(path))
    return True


def build_library(verbose: bool = False) -> Path:
    """Fetch the headers if they are missing, compile the .so if the source is newer, return its path.

    `verbose` streams the output of npm and g++ instead of capturing it.
    """
    missing = [str(path) for path in SOURCES + HEADERS if not path.is_file()]
    if missing:
        raise BuildError(f"kernel sources not found: {', '.join(missing)}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    fetch_headers(verbose)
    newest = max(path.stat().st_mtime for path in SOURCES + HEADERS)
    if LIBRARY.is_file() and LIBRARY.stat().st_mtime >= newest:
        log.info("kernel library is up to date: %s", LIBRARY)
        return LIBRARY
    compiler = shutil.which("g++")
    if compiler is None:
        raise BuildError("g++ not found on PATH: it is needed to compile the FlashAttention CPU kernel.")
    staging = (
        BUILD_DIR / f"{LIBRARY.name}.{os.getpid()}.tmp"
    )  # one per process: test workers may build at once
    command = [compiler, *CXXFLAGS, f"-I{HEADERS_DIR}", *map(str, SOURCES), "-o", str(staging)]
    log.info("compiling %s -> %s", ", ".join(path.name for path in SOURCES), LIBRARY)
    start = time.perf_counter()
    try:
        _run(command, verbose, "g++")
        staging.replace(LIBRARY)  # atomic: a process that already loaded the old .so keeps its copy
    finally:
        staging.unlink(missing_ok=True)
    log.info("built %s in %.1f s", LIBRARY, time.perf_counter() - start)
    return LIBRARY


def fetch_headers(verbose: bool = False) -> Path:
    """Put the ONNX Runtime headers in kernels/build/ort-headers/ unless they are already there."""
    if (HEADERS_DIR / "onnxruntime_cxx_api.h").is_file():
        return HEADERS_DIR
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            f"npm not found on PATH: it is needed once to fetch the ONNX Runtime headers "
            f"(npm pack {NPM_PACKAGE}) into {HEADERS_DIR}. Install npm, or copy the ORT >= 1.29 "
            f"headers (onnxruntime_c_api.h, onnxruntime_cxx_api.h, ...) there yourself."
        )
    log.info("fetching ONNX Runtime headers: npm pack %s (about 150 MB, once)", NPM_PACKAGE)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        _run([npm, "pack", NPM_PACKAGE], verbose, "npm pack", cwd=tmp)
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise BuildError(f"npm pack {NPM_PACKAGE} produced no tarball in {tmp}")
        staging = Path(tmp) / "ort-headers"
        count = _extract_headers(tarballs[0], staging)
        if not (staging / "onnxruntime_cxx_api.h").is_file():
            raise BuildError(
                f"{NPM_PACKAGE} has no {TARBALL_HEADERS}onnxruntime_cxx_api.h: did its layout change?"
            )
        if (HEADERS_DIR / "onnxruntime_cxx_api.h").is_file():
            return HEADERS_DIR  # another process fetched them meanwhile
        if HEADERS_DIR.exists():
            shutil.rmtree(HEADERS_DIR)  # a partial copy left by an interrupted fetch
        staging.rename(HEADERS_DIR)
    log.info("extracted %d headers to %s", count, HEADERS_DIR)
    return HEADERS_DIR


def _extract_headers(tarball: Path, destination: Path) -> int:
    """Copy the flat headers folder out of the npm tarball; returns how many files it copied."""
    destination.mkdir()
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            name = member.name.removeprefix(TARBALL_HEADERS)
            if member.isfile() and name != member.name and "/" not in name and name.endswith(".h"):
                (destination / name).write_bytes(archive.extractfile(member).read())
                count += 1
    return count


def _run(command: list[str], verbose: bool, what: str, cwd: str | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=not verbose, text=True)
    if result.returncode != 0:
        output = "" if verbose else (result.stderr or result.stdout)[-4000:]
        raise BuildError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.attention_cpu", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="fetch the ORT headers if missing and compile the library")
    build.add_argument("-v", "--verbose", action="store_true", help="show the output of npm and g++")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_library(verbose=args.verbose)
    except BuildError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
