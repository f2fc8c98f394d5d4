"""python -m services.gateway --config NODE.yaml: load config -> connect upstreams -> serve."""

from __future__ import annotations

import dataclasses

from protos.edge.v1 import gateway_pb2
from runtime.artifact import load_artifact
from runtime.errors import ArtifactError, ConfigError
from services.common.config import load_node_config
from services.common.server import ServiceHost, service_main, setup_logging
from services.gateway.servicer import GatewayServicer
from services.gateway.split_policy import SplitPolicy


async def serve(args) -> None:
    node = load_node_config(args.config)
    config = dataclasses.replace(node.gateway, address=args.address) if args.address else node.gateway
    setup_logging("gateway", node.log_level)
    servicer = GatewayServicer(config, node.model_name, _split_policy(node, config))
    host = ServiceHost("gateway", config, [(servicer, gateway_pb2.DESCRIPTOR.services_by_name["Gateway"])])
    await host.start()
    await host.set_serving(True)  # upstream availability is checked per request (retries, clear errors)
    await host.wait_for_stop()


def _split_policy(node, config) -> SplitPolicy:
    """The auto policy needs the KV cost of a handoff: configured per token, or the artifact's
    (Artifact.kv_handoff_bytes, searched up to the model's context for the break-even)."""
    if not config.prefill:
        return SplitPolicy(mode="never")  # co-located: decode runs every prompt
    artifact = None
    if config.split_policy == "auto" and not config.kv_bytes_per_token:
        try:
            artifact = load_artifact(node.artifact, verify=False)
        except ArtifactError as e:
            raise ConfigError(
                f"gateway.kv_bytes_per_token: 0 and the artifact cannot be read ({e}); "
                "set it, or give the gateway the artifact"
            ) from e
    try:
        if artifact is None:
            return SplitPolicy.from_config(config)
        return SplitPolicy.from_config(
            config,
            kv_handoff_bytes=artifact.kv_handoff_bytes,
            max_prompt_tokens=artifact.model.max_position_embeddings,
        )
    except ValueError as e:
        raise ConfigError(f"gateway.{e}") from e


def main() -> None:
    service_main("gateway", serve)


if __name__ == "__main__":
    main()
