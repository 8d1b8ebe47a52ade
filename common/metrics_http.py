"""Prometheus metrics and a health check over HTTP, in a thread beside a service's event loop.

`ServiceMetrics` is what each side's metrics module builds on: a registry of its own (several
services in one process never share a metric), makers for prefixed metrics, a progress clock, and
the endpoint. `serve_metrics` starts a small threaded HTTP server (stdlib wsgiref) that answers
`/metrics` from the registry and `/healthz` from the service's facts. A connection that says nothing
for `REQUEST_TIMEOUT_SECONDS` is closed, and at most `MAX_HANDLER_THREADS` are served at once (one
more is closed unanswered), so idle connections cannot pile up threads. Request handling never touches
the event loop: health facts and custom collectors run in the server's threads, so they read only
plain attributes that the loop writes (an int, a reference), never SQLite or the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from common.settings import MetricsTable
from schemas.errors import ChorusError

log = structlog.get_logger(__name__)

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
REQUEST_TIMEOUT_SECONDS = 10.0  # per socket read or write: a scraper sends its request at once
MAX_HANDLER_THREADS = 16  # connections served at once: scrapers and health checks are a handful


class MetricsError(ChorusError):
    """The metrics endpoint could not be served (typically: its port is taken)."""


@dataclass(frozen=True)
class Health:
    """What /healthz answers: 200 while connected to the broker, 503 otherwise, with `facts` as JSON."""

    connected: bool
    facts: Mapping[str, object] = field(default_factory=dict)

    def body(self) -> bytes:
        status = "ok" if self.connected else "disconnected"
        return json.dumps({"status": status, "connected": self.connected, **self.facts}).encode()


class ProgressClock:
    """When a service last made progress (monotonic), for /healthz's `seconds_since_progress`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def mark(self) -> None:
        self._last = self._clock()

    def seconds_since(self) -> float:
        return round(self._clock() - self._last, 3)


class ServiceMetrics:
    """A service's metrics (each named `prefix` + name), when it last made progress, and the HTTP
    endpoint that serves them while `serve` has it on."""

    def __init__(self, prefix: str) -> None:
        self.registry = CollectorRegistry()
        self.progress = ProgressClock()
        self.server: MetricsServer | None = None  # while serving: its `url` and bound `port`
        self._prefix = prefix

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(self._prefix + name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(self._prefix + name, documentation, registry=self.registry)

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(self._prefix + name, documentation, buckets=buckets, registry=self.registry)

    async def serve(
        self,
        table: MetricsTable,
        is_connected: Callable[[], bool],
        facts: Callable[[], Mapping[str, object]],
        *,
        service: str,
    ) -> None:
        """Serve when `table` enables it; see `serve_metrics`."""
        self.server = await serve_metrics(table, self.registry, is_connected, facts, service=service)

    async def stop_serving(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.close()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up the process's exit
    block_on_close = False  # nor closing: a handler ends by itself within the request timeout
    request_timeout: float  # set by MetricsServer, before serving starts
    handler_slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection while a slot is free; otherwise close it now, unanswered."""
        if not self.handler_slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: it will not give the slot back
            self.handler_slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.handler_slots.release()


class _QuietHandler(WSGIRequestHandler):
    server: _ThreadingWSGIServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)

    def handle(self) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):  # an idle or vanished client: closed
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one every few seconds would drown the service's own lines."""


def _server_class(host: str) -> type[_ThreadingWSGIServer]:
    """A server class for `host`'s address family (WSGIServer alone binds IPv4 only)."""
    try:
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise MetricsError(f"cannot serve metrics on host {host!r}: {e}; check [metrics] host") from e
    return type("MetricsHTTPServer", (_ThreadingWSGIServer,), {"address_family": family})


class MetricsServer:
    """`/metrics` from `registry` and `/healthz` from `health()` on host:port, served by a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], Health],
        *,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_handlers: int = MAX_HANDLER_THREADS,
    ) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        try:
            self._server = make_server(
                host, port, self._app, server_class=_server_class(host), handler_class=_QuietHandler
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                # Not "use another port": the usual holder is this same service already running (the
                # same settings file), and a second copy of it must not start at all.
                raise MetricsError(
                    f"cannot serve metrics on {host}:{port}: the port is already in use by another "
                    "process; if that is this service already running with these settings, leave it "
                    "be (or stop it) rather than start a second; otherwise choose another [metrics] "
                    "port for this one, or 0 for any free one"
                ) from e
            raise MetricsError(
                f"cannot serve metrics on {host}:{port} ({e.strerror or e}); "
                "choose another [metrics] port, or 0 for any free one"
            ) from e
        self._server.request_timeout = request_timeout
        self._server.handler_slots = threading.BoundedSemaphore(max_handlers)
        self.host = host
        self.port: int = self._server.server_port  # the bound one: port 0 picks a free port
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == HEALTH_PATH:
            try:
                health = self._health()
            except Exception as e:  # a bug in the callback must still answer, and say so
                log.warning("health_check_failed", error=repr(e))
                health = Health(connected=False, facts={"error": repr(e)})
            status = "200 OK" if health.connected else "503 Service Unavailable"
            body = health.body()
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Stop serving; `shutdown` waits for the serving loop's next poll, so off the event loop."""
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()


async def serve_metrics(
    table: MetricsTable,
    registry: CollectorRegistry,
    is_connected: Callable[[], bool],
    facts: Callable[[], Mapping[str, object]],
    *,
    service: str,
) -> MetricsServer | None:
    """Start serving when `table` enables it (None otherwise); the bound address is logged.

    /healthz says whether `is_connected()` (the service's transport's: see `Transport.is_connected`),
    with the service's `facts()`. Both are called from the server's thread: they must read plain
    attributes only.
    """
    if not table.enabled:
        return None

    def health() -> Health:
        return Health(is_connected(), facts())

    # Binding may resolve a host name: not on the event loop.
    server = await asyncio.to_thread(MetricsServer, table.host, table.port, registry, health)
    log.info("metrics_serving", service=service, url=server.url, metrics=METRICS_PATH, health=HEALTH_PATH)
    if not _is_loopback(table.host):
        log.warning(
            "metrics_not_on_loopback",
            service=service,
            host=table.host,
            hint="the endpoint has no authentication; restrict who can reach it",
        )
    return server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
