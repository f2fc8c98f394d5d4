"""python -m services.decode --config NODE.yaml: load config -> build engine -> serve."""

from __future__ import annotations

import asyncio
import dataclasses

from protos.edge.v1 import decode_pb2
from runtime.engine import Engine
from runtime.worker import EngineWorker
from services.common.config import load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.decode.kv_transfer import KvPuller
from services.decode.servicer import DecodeServicer


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.decode, address=args.address) if args.address else node.decode
    setup_logging("decode", node.log_level)
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

    await host.wait_for_stop(on_drained=drained)


def main() -> None:
    service_main("decode", serve)


if __name__ == "__main__":
    main()
