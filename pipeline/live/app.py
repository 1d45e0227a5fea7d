"""The live telemetry page: a FastAPI app that the Airflow api-server mounts at
`/f1` (see `plugins/f1_live.py`).

Consumers NOTIFY one update per committed batch (`pipeline.live.feed`); one
LISTEN connection here, through the read-only role, fans each update out to every
open page as a server-sent event, as it arrives. The page merges updates and
redraws at most every 50 ms. A slow browser loses its oldest queued updates
(each update holds every car's latest state, so the next one catches it up); the
loss is counted and shown, never silent.

Airflow does not put a plugin's app behind its login, so every route here
depends on `authenticate`, which the plugin wires to Airflow's own check of the
JWT (the `_token` cookie the UI sets at login, or a Bearer header).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from pipeline.settings import Settings

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("live.html")
QUEUE_DEPTH = 256  # updates per browser before the oldest is dropped (and counted)
RECONNECT_S = 1.0


@dataclass
class HubCounters:
    received: int = 0  # NOTIFY updates read from PostgreSQL
    dropped: int = 0  # updates a slow browser lost (its queue was full)
    reconnects: int = 0
    listening: bool = False
    last_error: str | None = None


@dataclass
class LiveHub:
    """One LISTEN connection shared by all open pages, started with the first."""

    settings: Settings
    counters: HubCounters = field(default_factory=HubCounters)
    _queues: set[asyncio.Queue[str]] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    def subscribe(self) -> asyncio.Queue[str]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen())
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_DEPTH)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._queues.discard(queue)

    @property
    def pages(self) -> int:
        return len(self._queues)

    def publish(self, payload: str) -> None:
        self.counters.received += 1
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                self.counters.dropped += 1
            queue.put_nowait(payload)

    async def _listen(self) -> None:
        import psycopg

        url = self.settings.postgres_url("telemetry_reader")
        channel = self.settings.live_channel  # validated as an SQL identifier
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {channel}")
                    self.counters.listening = True
                    self.counters.last_error = None
                    async for notice in conn.notifies():
                        self.publish(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the database restarting must not end the page
                self.counters.listening = False
                self.counters.reconnects += 1
                self.counters.last_error = str(err).strip()
                log.warning("live page: LISTEN %s failed (%s); retrying", channel, err)
                await asyncio.sleep(RECONNECT_S)


Authenticate = Callable[..., Awaitable[Any]]


def create_app(
    settings: Settings, authenticate: Authenticate, login_url: Callable[[str], str]
) -> FastAPI:
    """`authenticate`: a FastAPI dependency that raises 401/403 for a caller without
    valid credentials. `login_url(next)`: where a browser signs in."""
    hub = LiveHub(settings)
    app = FastAPI(title="F1 live telemetry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    signed_in = [Depends(authenticate)]

    @app.exception_handler(HTTPException)
    async def refused(request: Request, error: HTTPException) -> Response:
        if error.status_code not in (401, 403) or "text/html" not in request.headers.get(
            "accept", ""
        ):
            return JSONResponse({"detail": error.detail}, status_code=error.status_code)
        target = quote(str(request.url.path), safe="/")
        return HTMLResponse(
            "<!doctype html><title>F1 live: sign in</title>"
            "<p>The live page needs an Airflow login. "
            f'<a href="{login_url(target)}" target="_top">Sign in to Airflow</a>, '
            "then open it again.</p>",
            status_code=error.status_code,
        )

    @app.get("/", include_in_schema=False, dependencies=signed_in)
    async def root() -> RedirectResponse:
        return RedirectResponse("live")

    @app.get("/live", response_class=HTMLResponse, dependencies=signed_in)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})

    @app.get("/events", response_class=EventSourceResponse, dependencies=signed_in)
    async def events() -> AsyncIterator[ServerSentEvent]:
        queue = hub.subscribe()
        try:
            yield ServerSentEvent(
                event="hello", data={"channel": settings.live_channel, "server_us": _now_us()}
            )
            while True:
                yield ServerSentEvent(event="batch", raw_data=await queue.get())
        finally:
            hub.unsubscribe(queue)

    @app.get("/stats", dependencies=signed_in)
    async def stats() -> dict[str, Any]:
        return {"pages": hub.pages, **vars(hub.counters)}

    return app


def _now_us() -> int:
    return time.time_ns() // 1000
