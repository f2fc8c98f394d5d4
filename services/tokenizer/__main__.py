"""python -m services.tokenizer --config NODE.yaml: load config -> load tokenizer -> serve."""

from __future__ import annotations

import asyncio
import dataclasses

from protos.edge.v1 import tokenizer_pb2
from runtime.artifact import load_artifact
from runtime.tokenizer import Tokenizer
from services.common.config import load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.tokenizer.servicer import TokenizerServicer


def load_tokenizer(artifact_dir: str) -> Tokenizer:
    artifact = load_artifact(artifact_dir)
    info = artifact.tokenizer_info
    return Tokenizer.from_file(
        artifact.tokenizer_file,
        chat_template=info.get("chat_template"),
        bos_token_id=info.get("bos_token_id"),
        eos_token_ids=info.get("eos_token_ids") or (),
    )


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.tokenizer, address=args.address) if args.address else node.tokenizer
    setup_logging("tokenizer", node.log_level)
    servicer = TokenizerServicer(node.model_name)
    host = ServiceHost(
        "tokenizer", config, [(servicer, tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"])]
    )
    await host.start()  # health: NOT_SERVING while loading
    servicer.attach(await asyncio.to_thread(load_tokenizer, node.artifact))
    await host.set_serving(True)
    await host.wait_for_stop()


def main() -> None:
    service_main("tokenizer", serve)


if __name__ == "__main__":
    main()
