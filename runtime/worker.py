"""Runs an Engine on its own thread and serves asyncio callers (the services' event loops).

    worker = EngineWorker(engine); worker.start()
    async for event in worker.generate(prompt_ids, params):    # cancel the task to abort
        ...
    first, kv = await worker.prefill(prompt_ids, params)        # KV kept until worker.release(...)

The thread loops: take commands (new requests, aborts, calls) -> engine.step() -> hand each
event to its request's asyncio queue. It blocks only when the engine has no work. A request that
is cancelled, times out or whose consumer goes away is aborted at once, which frees its KV. If a
step fails, every active request gets the error and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from runtime.engine import Engine
from runtime.errors import EdgeError
from runtime.sampling import SamplingParams
from runtime.sequence import ImportedKV, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


class EngineWorker:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self._step_times: collections.deque[float] = collections.deque(maxlen=256)
        self._ids = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort what is left and end the thread (callers drain first if they want to)."""
        self._stopping = True
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    @property
    def active_requests(self) -> int:
        return len(self._subscribers)

    def steps_per_second(self) -> float:
        times = [t for t in self._step_times if t > time.monotonic() - 5.0]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    # -- asyncio side ------------------------------------------------------------------------------

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as e:  # handed to the caller, whatever it is
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._commands.put(command)
        return await future

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        imported: ImportedKV | None = None,
        keep_kv: bool = False,
    ) -> AsyncIterator[TokenEvent]:
        """The request's events as they are produced; leaving early (cancel, deadline) aborts it."""
        request_id = request_id or self._next_id()
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())

        def add(engine: Engine) -> None:
            engine.add_request(prompt_ids, params, request_id, keep_kv=keep_kv, imported=imported)
            self._subscribers[request_id] = subscriber

        finished = False
        try:
            await self.call(add)
            while not finished:
                item = await subscriber.events.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self._commands.put(lambda: self._abort(request_id))

    async def prefill(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> TokenEvent:
        """Run the prompt and sample one token; the KV stays kept under the event's request_id
        until `engine.export_kv` / `engine.release_kv` (called through `call`)."""
        one = dataclasses.replace(params, max_tokens=1)
        events = [e async for e in self.generate(prompt_ids, one, request_id, keep_kv=True)]
        return events[0]

    async def abort(self, request_id: str) -> bool:
        return await self.call(lambda engine: self._abort(request_id))

    def _next_id(self) -> str:
        self._ids += 1
        return f"w{id(self) % 10000}-{self._ids}"

    # -- engine thread -----------------------------------------------------------------------------

    def _abort(self, request_id: str) -> bool:
        """Abort on the engine; a listener still waiting gets the closing ABORT event."""
        event = self.engine.abort(request_id)
        if event is not None and request_id in self._subscribers:
            self._deliver(event)
        self._subscribers.pop(request_id, None)
        return event is not None

    def _run(self) -> None:
        while not self._stopping:
            self._take_commands(block=not self.engine.has_work())
            if self._stopping or not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a fault in a step: fail its requests, keep serving the rest
                log.exception("engine step failed")
                self._fail_all(EdgeError(f"engine step failed: {e}"))
                continue
            self._step_times.append(time.monotonic())
            for event in events:
                self._deliver(event)
        self._fail_all(EdgeError("the engine is shutting down"))

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, event: TokenEvent) -> None:
        subscriber = self._subscribers.get(event.request_id)
        if subscriber is None:
            return
        if event.finish_reason is not None:
            del self._subscribers[event.request_id]
        subscriber.loop.call_soon_threadsafe(subscriber.events.put_nowait, event)

    def _fail_all(self, error: Exception) -> None:
        for request_id, subscriber in list(self._subscribers.items()):
            self.engine.abort(request_id)  # its KV is freed; the listener gets the error instead
            subscriber.loop.call_soon_threadsafe(subscriber.events.put_nowait, error)
        self._subscribers.clear()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
