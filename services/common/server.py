"""The shell every service shares: a grpc.aio server with health, reflection, JSON logs and a
graceful stop.

    host = ServiceHost("decode", cfg, [(servicer, decode_pb2.DESCRIPTOR.services_by_name["Decode"])])
    await host.start()            # listening; health says NOT_SERVING
    ... load the model ...
    host.set_serving(True)        # health: SERVING
    await host.wait_for_stop()    # returns after SIGTERM/SIGINT and the drain

Handlers are built from the service descriptors (not the generated `add_*_to_server`) so that each
call is wrapped the same way: the request id (metadata `x-request-id`, or a new one) goes into the
logs; a request that does not parse becomes INVALID_ARGUMENT, not INTERNAL; runtime errors map to
status codes through services/common/errors.py; start, end, status and duration are logged.
Client-streaming methods get the same wrapping: the handler receives an async iterator of requests
in which a message that does not parse raises InvalidRequestError when it is reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.errors import EdgeError, InvalidRequestError
from services.common.config import ServerConfig
from services.common.errors import status_for

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
log = logging.getLogger("edge.rpc")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, request id, message and any extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self.service,
            "request_id": request_id_var.get(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class MalformedRequest:
    """What a handler receives for bytes that do not parse as its request message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant_parser(message_class) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # protobuf's DecodeError, or invalid UTF-8 in a string field
            return MalformedRequest(e)

    return parse


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value[:128]
    return uuid.uuid4().hex[:16]


async def _fail(context, method: str, error: Exception, started: float):
    code = status_for(error)
    level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
    log.log(
        level,
        "rpc failed",
        exc_info=code == grpc.StatusCode.INTERNAL,
        extra={
            "fields": {
                "method": method,
                "code": code.name,
                "error": str(error),
                "ms": round((time.perf_counter() - started) * 1e3, 2),
            }
        },
    )
    await context.abort(code, str(error))


def _checked(method: str, request) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequestError(
            f"the request is not a valid {method} message ({request.error}); "
            "a string field may hold invalid UTF-8"
        )


async def _checked_stream(method: str, requests):
    async for request in requests:
        _checked(method, request)
        yield request


def _incoming(method: str, request, client_streaming: bool):
    """What the servicer's method receives: the checked request, or a checked request iterator."""
    if client_streaming:
        return _checked_stream(method, request)
    _checked(method, request)
    return request


def _wrap_unary(method: str, fn, client_streaming: bool = False):
    async def handler(request, context):
        request_id_var.set(_request_id(context))
        started = time.perf_counter()
        try:
            response = await fn(_incoming(method, request, client_streaming), context)
        except Exception as e:
            if isinstance(e, (asyncio.CancelledError, grpc.aio.AbortError)):
                raise
            await _fail(context, method, e, started)
        log.info(
            "rpc ok",
            extra={"fields": {"method": method, "ms": round((time.perf_counter() - started) * 1e3, 2)}},
        )
        return response

    return handler


def _wrap_stream(method: str, fn, client_streaming: bool = False):
    async def handler(request, context):
        request_id_var.set(_request_id(context))
        started = time.perf_counter()
        count = 0
        try:
            async for response in fn(_incoming(method, request, client_streaming), context):
                count += 1
                yield response
        except Exception as e:
            if isinstance(e, (asyncio.CancelledError, grpc.aio.AbortError)):
                raise
            await _fail(context, method, e, started)
        log.info(
            "rpc ok",
            extra={
                "fields": {
                    "method": method,
                    "messages": count,
                    "ms": round((time.perf_counter() - started) * 1e3, 2),
                }
            },
        )

    return handler


_HANDLER_KINDS = {  # (client streaming, server streaming) -> grpc's handler constructor
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer, service: pb_descriptor.ServiceDescriptor) -> grpc.GenericRpcHandler:
    """A generic handler for every method of `service` implemented by `servicer`."""
    handlers = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        full_name = f"{service.full_name}/{method.name}"
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        wrap = _wrap_stream if method.server_streaming else _wrap_unary
        handlers[method.name] = make(
            wrap(full_name, fn, method.client_streaming),
            request_deserializer=_tolerant_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class ServiceHost:
    """One gRPC server process: our services + health + reflection, stopped gracefully."""

    def __init__(
        self, name: str, config: ServerConfig, services: list[tuple[object, pb_descriptor.ServiceDescriptor]]
    ):
        self.name = name
        self.config = config
        self.service_names = [s.full_name for _, s in services]
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers([method_handlers(s, d) for s, d in services])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            self.service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self._stop = asyncio.Event()

    async def start(self) -> int:
        self.port = self.server.add_insecure_port(self.config.address)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {self.config.address} (in use?)")
        await self.set_serving(False)
        await self.server.start()
        host = self.config.address.rsplit(":", 1)[0]
        log.info("listening", extra={"fields": {"address": f"{host}:{self.port}"}})
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop(self, on_drained: Callable[[], None] | None = None) -> None:
        """Until SIGTERM/SIGINT: then NOT_SERVING, refuse new calls, let in-flight ones finish."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        log.info("draining", extra={"fields": {"grace_s": self.config.drain_seconds}})
        await self.set_serving(False)
        await self.server.stop(grace=self.config.drain_seconds)
        if on_drained is not None:
            on_drained()
        log.info("stopped")


def service_main(name: str, serve: Callable[[argparse.Namespace], Awaitable[None]]) -> None:
    """`python -m services.<name> [--config NODE.yaml] [--address host:port]`; a startup error
    (bad config or artifact) prints one line and exits with status 2."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("--config", help="node YAML (default: every service on this host)")
    parser.add_argument("--address", help="host:port to listen on, overriding the config")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args))
    except (EdgeError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
