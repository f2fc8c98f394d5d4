#!/usr/bin/env bash
# Build the images locally; no registry is reachable or needed.
#
#   deploy/scripts/build-images.sh [base] [runtime] [media] [export] [gpu]   # default: all but gpu
#
#   edge-base:bookworm     Debian 12 minbase + python3 + the host's CA certificates, made by mmdebstrap
#   edge-runtime:latest    the services: onnxruntime, tokenizers, grpcio, ... and our native kernel; no torch
#   edge-media:latest      edge-runtime + the media service's image stack (OpenCV, SciPy, Pillow, PyAV, LibRaw)
#   edge-export:latest     edge-runtime + torch (CPU) + the exporter and the embedded model, for `export-model`
#   edge-gpu:latest        the services on the torch backend for NVIDIA nodes (CUDA torch from PyPI, large;
#                          needs no NVIDIA base image: the CUDA libraries come in torch's nvidia-* wheels)
#
# The base is rebuilt whenever the host's CA certificates change (one is made at boot where outbound
# TLS is re-signed; without it pip inside `docker build` fails with CERTIFICATE_VERIFY_FAILED).
# The export image installs torch from deploy/wheels/ when a wheel is there: `pip download` fills it
# from pip's local wheels or cache on hosts that have one, else from PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# pip for `pip download` only: the project venv's when there is one (CI runs outside any venv)
PIP="$ROOT/.venv/bin/pip"
[ -x "$PIP" ] || PIP=pip
cd "$ROOT"
BASE=edge-base:bookworm
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

log() { echo "build-images: $*" >&2; }

ca_hash() {
  cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-16
}

build_base() {
  local want have
  want="$(ca_hash)"
  have="$(docker image inspect -f '{{index .Config.Labels "edge.ca"}}' "$BASE" 2>/dev/null || true)"
  if [ "$have" = "$want" ]; then
    log "$BASE is up to date"
    return
  fi
  local sources=http://deb.debian.org/debian
  [ -f /etc/apt/sources.list.d/debian.sources ] && sources=/etc/apt/sources.list.d/debian.sources
  log "$BASE: mmdebstrap from $sources"
  mmdebstrap --quiet --mode=root --variant=minbase \
    --include=python3,python3-venv,ca-certificates,libstdc++6 \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null || true' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm - "$sources" |
    docker import --change "LABEL edge.ca=$want" --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
}

build_runtime() {
  log "edge-runtime:latest"
  docker build --quiet -f deploy/Dockerfile -t edge-runtime:latest . >/dev/null
}

build_media() {
  log "edge-media:latest"
  docker build --quiet -f deploy/Dockerfile.media -t edge-media:latest deploy >/dev/null
}

build_export() {
  # torch comes from deploy/wheels/ when a wheel is there; pip download copies it from pip's
  # find-links or cache on hosts that have it (no download), else fetches it from PyPI.
  mkdir -p deploy/wheels
  if ! ls deploy/wheels/torch-*.whl >/dev/null 2>&1; then
    "$PIP" download --quiet --no-deps --only-binary :all: "$TORCH_SPEC" -d deploy/wheels 2>/dev/null ||
      log "no torch wheel staged; the export image installs $TORCH_SPEC from PyPI"
  fi
  log "edge-export:latest"
  docker build --quiet -f deploy/Dockerfile.export --build-arg TORCH_SPEC="$TORCH_SPEC" \
    -t edge-export:latest deploy >/dev/null
}

build_gpu() {
  log "edge-gpu:latest (CUDA torch from PyPI: several GB)"
  docker build --quiet -f deploy/Dockerfile.gpu -t edge-gpu:latest deploy >/dev/null
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(base runtime media export)
for target in "${targets[@]}"; do
  case "$target" in
    base | runtime | media | export | gpu) "build_$target" ;;
    *) log "unknown image '$target' (base, runtime, media, export, gpu)"; exit 2 ;;
  esac
done
