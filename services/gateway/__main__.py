"""python -m services.gateway --config NODE.yaml: load config -> connect upstreams -> serve."""

from __future__ import annotations

import dataclasses

from protos.edge.v1 import gateway_pb2
from services.common.config import load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.gateway.servicer import GatewayServicer


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.gateway, address=args.address) if args.address else node.gateway
    setup_logging("gateway", node.log_level)
    servicer = GatewayServicer(config, node.model_name)
    host = ServiceHost("gateway", config, [(servicer, gateway_pb2.DESCRIPTOR.services_by_name["Gateway"])])
    await host.start()
    await host.set_serving(True)  # upstream availability is checked per request (retries, clear errors)
    await host.wait_for_stop()


def main() -> None:
    service_main("gateway", serve)


if __name__ == "__main__":
    main()
