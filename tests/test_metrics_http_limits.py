"""The metrics endpoint against idle connections, over real sockets: closed after the request timeout,
and never more handler threads than its limit."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from common.metrics_http import Health, MetricsServer

TIMEOUT = 0.5
HANDLERS = 4


def handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (EOF or a reset) within `seconds` of now, sending nothing."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def close_times(sockets: list[socket.socket], since: float, *, within: float) -> list[float]:
    """When the server closed each socket, in seconds after `since`; fails if one is open after `within`."""
    times: list[float] = []
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        while len(times) < len(sockets):
            left = since + within - time.monotonic()
            ready = selector.select(left) if left > 0 else []
            assert ready, f"{len(sockets) - len(times)} idle connections stayed open past {within}s"
            for key, _ in ready:
                assert closed_within(key.fileobj, 0.0)  # type: ignore[arg-type]
                times.append(time.monotonic() - since)
                selector.unregister(key.fileobj)
    return times


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    Counter("chorus_test_scrapes", "Scrapes.", registry=registry).inc()
    served = MetricsServer(
        "127.0.0.1", 0, registry, lambda: Health(True), request_timeout=TIMEOUT, max_handlers=HANDLERS
    )
    try:
        yield served
    finally:
        asyncio.run(served.close())


def open_idle(server: MetricsServer, count: int) -> list[socket.socket]:
    """`count` connections that send nothing, opened one at a time so that the listen backlog (5) never
    overflows: a dropped SYN would be retried a second later, and the connections reordered."""
    idle = []
    for _ in range(count):
        idle.append(socket.create_connection(("127.0.0.1", server.port)))
        time.sleep(0.01)
    return idle


def test_idle_connections_are_closed_and_threads_stay_bounded(server: MetricsServer) -> None:
    """30 connections that say nothing: before, 30 threads held forever; now at most HANDLERS at any time,
    the others closed at once, and every one closed by the request timeout."""
    before = handler_threads()
    most = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal most
        while not sampling.wait(0.005):
            most = max(most, handler_threads() - before)

    sampler = threading.Thread(target=sample)
    sampler.start()
    opened = time.monotonic()
    idle = open_idle(server, 30)
    try:
        closed_after = close_times(idle, opened, within=3.0)
    finally:
        sampling.set()
        sampler.join()
        for s in idle:
            s.close()
    assert 0 < most <= HANDLERS
    refused_at_once = [t for t in closed_after if t < TIMEOUT - 0.05]
    assert len(refused_at_once) >= len(idle) - 2 * HANDLERS  # past the limit: closed unanswered
    assert TIMEOUT - 0.05 < max(closed_after) < 3.0  # the ones served waited for the timeout, no more
    deadline = time.monotonic() + 2.0
    while handler_threads() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handler_threads() == before
    assert b"chorus_test_scrapes_total 1.0" in scrape(server.url)  # the slots came back


def test_a_scrape_is_answered_beside_idle_connections(server: MetricsServer) -> None:
    idle = open_idle(server, HANDLERS - 1)
    try:
        assert b"chorus_test_scrapes_total 1.0" in scrape(server.url)
    finally:
        for s in idle:
            s.close()


def test_a_client_that_sends_half_a_request_is_closed_at_the_timeout(server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert closed_within(slow, 2.0)
        assert time.monotonic() - started < TIMEOUT + 0.5
