"""The daemon's HTTP endpoint (`http: {host, port}`; off by default): /metrics for Prometheus, /healthz and
/readyz for probes, the live view at / with its server-sent events at /events, and /view.json. aiohttp on
an event loop of its own in a thread of the driver; it only reads the Monitor, so a slow or stuck client
holds up nothing of the daemon. It holds at most MAX_CONNECTIONS connections (each is a file descriptor of the
driver: with none left, its ZeroMQ and Ray sockets could not open), of them at most MAX_STREAMS live views, and
closes one that sends no complete request for IDLE_S, or does not read what it asked for in IDLE_S, and one
that has made MAX_REQUESTS requests, so that clients that connect and never ask (or ask a byte at a time), or
ask without end (thousands of requests pipelined at once) or never read, cannot take them all, and probes and
scrapes always find room."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from importlib import resources

import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from mmfuse.daemon.monitor import Monitor
from mmfuse.logs import Tally

EVENT_INTERVAL_S = 1.0
MAX_CONNECTIONS = 256  # live-view tabs, probes and scrapers together; beyond it a connection is closed at once
MAX_STREAMS = 64       # live views (/events, which never end) among them: the rest stay free for probes
IDLE_S = 10.0          # a connection with no complete request, or whose answers are not read, for this long is closed
MAX_REQUESTS = 100     # requests one connection may make; it is closed after the last one's answer (as nginx does)
PAGE = resources.files("mmfuse.daemon").joinpath("live_view.html")


def application(monitor: Monitor, max_streams: int = MAX_STREAMS, max_requests: int = MAX_REQUESTS) \
        -> web.Application:
    page = PAGE.read_text()
    answered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection (transport) -> requests

    @web.middleware
    async def bounded_connections(request, handler):
        response = await handler(request)
        transport = request.transport
        if transport is not None:
            answered[transport] = answered.get(transport, 0) + 1
            if answered[transport] >= max_requests:
                response.force_close()  # (what it pipelined beyond is not answered)
        return response

    async def healthz(_request):
        return web.json_response({"status": "alive", "phase": monitor.phase})

    async def readyz(_request):
        not_ready = monitor.not_ready()
        return web.json_response({"ready": not not_ready, "not_ready": not_ready}, status=503 if not_ready else 200)

    async def live_view(_request):
        return web.Response(text=page, content_type="text/html")

    async def view(_request):
        return web.json_response(monitor.view())

    streams = 0

    async def events(request):
        nonlocal streams
        if streams >= max_streams:
            return web.json_response({"error": f"{max_streams} live views are open; close one"}, status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        streams += 1
        try:
            await response.prepare(request)
            while True:
                await response.write(f"data: {json.dumps(monitor.view())}\n\n".encode())
                await asyncio.sleep(EVENT_INTERVAL_S)
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        finally:
            streams -= 1

    app = web.Application(middlewares=[bounded_connections])
    app.router.add_get("/metrics", make_aiohttp_handler(monitor.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/view.json", view)
    app.router.add_get("/events", events)
    app.router.add_get("/", live_view)
    return app


class WebServer:
    """start() binds (or says why it cannot), then serves until stop()."""

    def __init__(self, monitor: Monitor, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                 max_streams: int = MAX_STREAMS, idle_s: float = IDLE_S, max_requests: int = MAX_REQUESTS, log=None):
        # aiohttp logs a traceback for every malformed request, outside the daemon's log format: one client
        # could fill the log with them. It answers them 400 all the same.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        self.monitor, self.host, self.port = monitor, host, port
        self.max_connections, self.idle_s = max_connections, idle_s
        self.log = log or structlog.get_logger()
        self.refused = Tally()
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(application(monitor, max_streams, max_requests), access_log=None,
                                    shutdown_timeout=1.0, keepalive_timeout=idle_s)
        self.listener: asyncio.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="http", daemon=True)

    def start(self) -> str | None:
        self.loop.run_until_complete(self.runner.setup())
        try:
            self.listener = self.loop.run_until_complete(
                self.loop.create_server(self._connection, self.host, self.port, reuse_address=True))
        except OSError as exc:
            self.loop.run_until_complete(self.runner.cleanup())
            return f"http: cannot listen on {self.host}:{self.port} ({exc.strerror}); choose a free http.port"
        self.sweeper = self.loop.create_task(self._close_unread())
        self.thread.start()
        return None

    async def _close_unread(self) -> None:
        """Close a connection whose client has not read its answers for idle_s: its send buffer is full (asyncio
        paused writing to it) and has not moved. aiohttp waits for such a client for ever, and clients that ask
        (pipelining request after request) and never read could hold every connection."""
        unmoved: dict[object, tuple[int, float]] = {}  # connection -> its send buffer's size, and since when
        while True:
            await asyncio.sleep(self.idle_s / 4)
            now, before, unmoved = self.loop.time(), unmoved, {}
            for connection in list(self.runner.server.connections):
                transport = connection.transport
                if transport is None or not connection.writing_paused:
                    continue
                size = transport.get_write_buffer_size()
                since = before[connection][1] if before.get(connection, (None,))[0] == size else now
                if now - since < self.idle_s:
                    unmoved[connection] = (size, since)
                    continue
                transport.abort()
                if self.refused.add("unread"):
                    self.log.warning("http connection closed: its client does not read its answers",
                                     closed=self.refused.counts["unread"], idle_s=self.idle_s)

    def _connection(self) -> asyncio.Protocol:
        """aiohttp's handler for a new connection, or, with MAX_CONNECTIONS open, one that closes it at once."""
        if len(self.runner.server.connections) < self.max_connections:
            return self.runner.server()
        if self.refused.add("connections"):
            self.log.warning("http connection refused: too many open", open=len(self.runner.server.connections),
                             refused=self.refused.counts["connections"], hint=f"at most {self.max_connections}; "
                             f"one that sends no complete request is closed after {self.idle_s:g} s")
        return _Refused()

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _close(self) -> None:
        self.sweeper.cancel()
        self.listener.close()
        await self.runner.cleanup()  # (closes the connections, which wait_closed may wait for)
        await self.listener.wait_closed()


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # (a reset: the descriptor is free at once)
