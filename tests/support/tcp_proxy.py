"""A TCP proxy on 127.0.0.1 that can drop, stall or slow the connections through it.

Clients connect to `proxy.port`; each connection is forwarded to the target.
Faults, as a network would cause them:

- `drop()`: close every open connection at once (both sides see a reset/EOF);
- `stall(seconds)`: stop forwarding bytes in both directions, on open and new
  connections, for `seconds` (nothing is lost: bytes wait in the proxy);
- `slow(delay, bytes_per_second)`: delay every chunk by `delay` seconds and cap
  each direction's throughput; `slow(0, None)` restores full speed.

Runs on the caller's event loop: `async with TcpProxy(port) as proxy: ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections_made = 0
        self.bytes_forwarded = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stall_task: asyncio.Task[None] | None = None
        self._delay = 0.0
        self._rate: float | None = None

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    def url(self, url: str) -> str:
        """`url` (amqp://user:pw@host:PORT/vhost...) pointed at the proxy instead of the target."""
        return url.replace(f"@{self.target_host}:{self.target_port}/", f"@127.0.0.1:{self.port}/", 1)

    # -- faults ------------------------------------------------------------

    async def drop(self) -> None:
        """Close every connection now; new ones are accepted as before."""
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def stall(self, seconds: float) -> None:
        """Forward nothing for `seconds` (a frozen link or a partition that heals)."""
        self._flowing.clear()
        if self._stall_task is not None:
            self._stall_task.cancel()
        self._stall_task = asyncio.get_running_loop().create_task(self._resume_after(seconds))

    def slow(self, delay: float, bytes_per_second: float | None = None) -> None:
        self._delay = delay
        self._rate = bytes_per_second

    async def _resume_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._flowing.set()

    # -- plumbing ----------------------------------------------------------

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._stall_task is not None:
            self._stall_task.cancel()
        self._flowing.set()
        await self.drop()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        self.connections_made += 1
        self._writers.update((client_writer, upstream_writer))
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump(client_reader, upstream_writer, client_writer)),
            loop.create_task(self._pump(upstream_reader, client_writer, upstream_writer)),
        ]
        self._pumps.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                await self._flowing.wait()
                started = time.monotonic()
                if self._delay:
                    await asyncio.sleep(self._delay)
                if self._rate:
                    await asyncio.sleep(max(0.0, len(chunk) / self._rate - (time.monotonic() - started)))
                await self._flowing.wait()  # a stall that began while this chunk waited holds it too
                writer.write(chunk)
                await writer.drain()
                self.bytes_forwarded += len(chunk)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end both, as a TCP proxy does.
            for end in (writer, other):
                end.transport.abort()
                self._writers.discard(end)
