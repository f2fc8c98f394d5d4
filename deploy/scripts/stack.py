#!/usr/bin/env python3
"""Render docker-compose.yml + deploy/swarm.yml into a Docker Swarm stack file; validate or deploy it.

    deploy/scripts/stack.py render > stack.yml        # the stack file, on stdout
    deploy/scripts/stack.py check                     # render, then `docker stack config` validates it
    deploy/scripts/stack.py deploy [STACK]            # render, validate, `docker stack deploy` (edge)

`docker compose config` does the merging and the ${VAR} interpolation; this script then removes what
Swarm's stack loader rejects or does not run (depends_on with conditions, restart, build, the project
name, x- anchors), and names each config after a hash of its content (Swarm configs cannot change in
place, so an edited profile gets a new name and the services roll over to it).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = ["docker-compose.yml", "deploy/swarm.yml"]
DROPPED = ("depends_on", "restart", "build", "pull_policy", "container_name")


def render() -> dict:
    command = ["docker", "compose"] + [a for f in FILES for a in ("-f", str(ROOT / f))]
    out = subprocess.run(command + ["config", "--format", "json"], check=True, capture_output=True, text=True)
    compose = json.loads(out.stdout)
    for service in compose["services"].values():
        for key in DROPPED + tuple(k for k, v in service.items() if v is None):
            service.pop(key, None)
        for port in service.get("ports", []):
            port["published"] = int(port["published"])  # compose renders it as a string
    for section in ("networks", "volumes"):  # the stack names them <stack>_<name> itself
        for entry in compose.get(section, {}).values():
            entry.pop("name", None)
    for config in compose.get("configs", {}).values():
        digest = hashlib.sha256(Path(config["file"]).read_bytes()).hexdigest()[:10]
        config["name"] = f"{config.pop('name', 'edge').split('_')[0]}-{Path(config['file']).stem}-{digest}"
    stack = {"version": "3.9"}
    stack.update({k: v for k, v in compose.items() if k in ("services", "networks", "volumes", "configs")})
    return stack  # `docker compose config` keeps literal dollars escaped ($$), as the stack loader wants


def check(path: Path) -> None:
    subprocess.run(["docker", "stack", "config", "-c", str(path)], check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("render", "check", "deploy"):
        print(__doc__, file=sys.stderr)
        return 2
    text = yaml.safe_dump(render(), sort_keys=False)
    if argv[0] == "render":
        sys.stdout.write(text)
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        f.write(text)
        f.flush()
        check(Path(f.name))
        if argv[0] == "deploy":
            name = argv[1] if len(argv) > 1 else "edge"
            subprocess.run(["docker", "stack", "deploy", "--prune", "-c", f.name, name], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
