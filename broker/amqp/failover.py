"""A robust connection over several broker addresses (the nodes of one cluster).

aio-pika's robust connection reconnects to the one URL it was given, so a client whose node died
would wait for that node to come back while the rest of the cluster serves. `FailoverConnection`
moves to the next address before every connection attempt after the first: once the node it was
connected to is lost, or unreachable at a reconnect, the next one is tried, round robin. Channels,
consumers and publishers are restored on the new node by the robust connection as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from aio_pika import RobustConnection
from yarl import URL

log = structlog.get_logger(__name__)


class FailoverConnection(RobustConnection):
    """`RobustConnection` whose URL rotates through `urls` at each connection attempt but the first.

    aio-pika clears `transport` right before each attempt (and reads `url` for it), so that is where
    the rotation happens; a test on a real cluster checks it still does with the aio-pika installed.
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self._addresses = [URL(url) for url in urls]
        self._current = 0
        self._attempts = 0
        self._transport: Any = None
        super().__init__(self._addresses[0], **kwargs)

    @property
    def url(self) -> URL:
        return self._addresses[self._current]

    @url.setter
    def url(self, value: URL) -> None:  # aio-pika sets it at start and on a secret update
        self._addresses[self._current] = value

    @property
    def transport(self) -> Any:
        return self._transport

    @transport.setter
    def transport(self, value: Any) -> None:
        # None: an attempt starts (or close(), which is harmless); not yet set up: the constructor.
        if value is None and not getattr(self, "_close_called", True):
            self._next_attempt()
        self._transport = value

    def _next_attempt(self) -> None:
        self._attempts += 1
        if self._attempts > 1 and len(self._addresses) > 1:
            self._current = (self._current + 1) % len(self._addresses)
            log.info("broker_failover", trying=self.url.with_password("***").human_repr())
