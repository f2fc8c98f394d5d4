"""python -m services.media --config NODE.yaml: load config -> warm up the codecs -> serve."""

from __future__ import annotations

import asyncio
import dataclasses

from protos.edge.v1 import media_pb2
from services.common.config import MediaConfig, load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.media.servicer import MediaServicer


def build_studio(config: MediaConfig):
    """Import the image stack (OpenCV, PyAV, Pillow plugins) before health says SERVING."""
    from services.media.jobs import MediaStudio

    return MediaStudio(config)


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.media, address=args.address) if args.address else node.media
    setup_logging("media", node.log_level)
    servicer = MediaServicer(config)
    host = ServiceHost("media", config, [(servicer, media_pb2.DESCRIPTOR.services_by_name["Media"])])
    await host.start()  # health: NOT_SERVING while loading
    servicer.attach(await asyncio.to_thread(build_studio, config))
    await host.set_serving(True)

    def drained() -> None:
        servicer.draining = True

    await host.wait_for_stop(on_drained=drained)


def main() -> None:
    service_main("media", serve)


if __name__ == "__main__":
    main()
