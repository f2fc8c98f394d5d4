"""python -m services.prefill --config NODE.yaml: load config -> build engine -> serve."""

from __future__ import annotations

import asyncio
import dataclasses

from protos.edge.v1 import prefill_pb2
from runtime.engine import Engine
from runtime.worker import EngineWorker
from services.common.config import load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.prefill.servicer import PrefillServicer


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.prefill, address=args.address) if args.address else node.prefill
    setup_logging("prefill", node.log_level)
    servicer = PrefillServicer(node.model_name, config)
    host = ServiceHost("prefill", config, [(servicer, prefill_pb2.DESCRIPTOR.services_by_name["Prefill"])])
    await host.start()  # health: NOT_SERVING while loading
    engine = await asyncio.to_thread(Engine.from_artifact, node.artifact, node.runtime)
    worker = EngineWorker(engine)
    worker.start()
    servicer.attach(worker)
    await host.set_serving(True)
    await host.wait_for_stop(on_drained=worker.stop)


def main() -> None:
    service_main("prefill", serve)


if __name__ == "__main__":
    main()
