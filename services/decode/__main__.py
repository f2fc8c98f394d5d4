"""python -m services.decode --config NODE.yaml: load config -> build engine -> serve.

With `runtime.tensor_parallel: N` (torch backend) the model is sharded over N processes started by torchrun:

    torchrun --nproc-per-node N -m services.decode --config NODE.yaml

Rank 0 is the service: it builds the engine over its shard and serves gRPC; every step it runs is first
broadcast to the other ranks (runtime/tensor_parallel.py). Ranks 1.. serve nothing: they build the same
sharded backend and follow rank 0's steps until it tells them to stop, after its drain. They ignore SIGTERM
(torchrun passes it to every rank) so that rank 0 can finish its in-flight streams first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

from protos.edge.v1 import decode_pb2
from runtime.engine import Engine
from runtime.errors import ConfigError
from runtime.worker import EngineWorker
from services.common.config import load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.decode.kv_transfer import KvPuller
from services.decode.servicer import DecodeServicer

log = logging.getLogger(__name__)


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.decode, address=args.address) if args.address else node.decode
    setup_logging("decode", node.log_level)
    rank = join_tensor_parallel_group(node.runtime)
    if rank > 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains first, then stops us
        await asyncio.to_thread(follow, node)
        return
    servicer = DecodeServicer(node.model_name)
    host = ServiceHost("decode", config, [(servicer, decode_pb2.DESCRIPTOR.services_by_name["Decode"])])
    await host.start()  # health: NOT_SERVING while loading
    engine = await asyncio.to_thread(Engine.from_artifact, node.artifact, node.runtime)
    worker = EngineWorker(engine)
    worker.start()
    servicer.attach(worker, KvPuller(config.max_message_bytes))
    await host.set_serving(True)

    def drained() -> None:
        servicer.draining = True
        worker.stop()
        tp = getattr(engine.backend, "tensor_parallel", None)  # only the torch backend shards
        if tp is not None:  # the engine thread has ended: no step in flight
            tp.stop_followers()

    await host.wait_for_stop(on_drained=drained)


def join_tensor_parallel_group(runtime) -> int:
    """This process's rank: 0 without tensor parallelism; else joins torchrun's group (NCCL on CUDA)."""
    if runtime.tensor_parallel == 1:
        return 0
    from runtime.tensor_parallel import init_from_env

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != runtime.tensor_parallel:
        n = runtime.tensor_parallel
        raise ConfigError(
            f"runtime.tensor_parallel: {n}, but {world} process(es) were started; launch with "
            f"torchrun --nproc-per-node {n} -m services.decode --config ..."
        )
    rank, _ = init_from_env(runtime.device)
    log.info("tensor parallel rank %d of %d", rank, world)
    return rank


def follow(node) -> None:
    """Ranks 1..: run rank 0's steps on this rank's shard until it says stop."""
    from runtime.tensor_parallel import follow_from_artifact

    steps = follow_from_artifact(node.artifact, node.runtime)
    log.info("rank 0 stopped the group after %d steps", steps)


def main() -> None:
    service_main("decode", serve)


if __name__ == "__main__":
    main()
