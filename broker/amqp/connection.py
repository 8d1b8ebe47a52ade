"""`AmqpConnection`: one robust aio-pika connection as the user named in the URL, and its channels.

It opens the connection once, hands out channels (with or without publisher confirms), and turns
what aiormq raises into Chorus's errors (`guard`): a refusal names the user and the permission to
check, a missing queue or exchange says to declare the topology, a lost connection says to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker.addresses import BrokerUrls, broker_urls
from broker.amqp.failover import FailoverConnection
from broker.errors import AccessRefused, BrokerError, ChannelUnavailable, TopologyMissing

log = structlog.get_logger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RECONNECT_INTERVAL = 1.0

# Errors that mean "the connection or channel went away", not "the broker said no".
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ConnectionClosed,
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
)
CHANNEL_GONE: tuple[type[BaseException], ...] = (*CONNECTION_LOST, aiormq.exceptions.ChannelClosed)

T = TypeVar("T")


def describe_url(url: str) -> str:
    """host:port/vhost as user, without the password, for error messages and logs."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return (
        f"{parts.scheme}://{parts.hostname}:{port} vhost {vhost!r} as user {unquote(parts.username or '')!r}"
    )


def describe_urls(urls: Sequence[str]) -> str:
    """`describe_url` of one address, or of each of several, `;`-separated."""
    return "; ".join(describe_url(url) for url in urls)


def user_of(url: str) -> str:
    """The login user of an AMQP URL (`guest` when it names none, as aio-pika assumes)."""
    return unquote(urlsplit(url).username or "guest")


def rpc_cancelled_by_connection_loss() -> bool:
    """Whether a CancelledError came from aiormq dropping a pending RPC as its connection closed.

    aiormq cancels the futures of RPCs in flight (channel open, declare, publish) when the
    connection dies; that is a lost connection, not a cancellation of the task awaiting it.
    """
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


async def close_quietly(channel: AbstractChannel) -> None:
    """Close `channel` unless it is closed already; a connection lost meanwhile is no error."""
    if channel.is_closed:
        return
    with contextlib.suppress(*CONNECTION_LOST, aiormq.exceptions.AMQPError):
        await channel.close()


class AmqpConnection:
    """A robust connection to RabbitMQ, opened on first use, and the channels opened on it."""

    def __init__(
        self,
        url: BrokerUrls,
        *,
        connection_name: str = "chorus",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL,
    ) -> None:
        self.urls = broker_urls(url)
        self.user = user_of(self.urls[0])
        self.where = describe_urls(self.urls)  # for messages: never the password
        self._connection_name = connection_name
        self._connect_timeout = connect_timeout
        self._reconnect_interval = reconnect_interval
        self._connection: FailoverConnection | None = None
        self._lock = asyncio.Lock()
        self._refused = False

    @property
    def url(self) -> str:
        """The first URL it connects to (with the password: never log it, log `where`)."""
        return self.urls[0]

    @property
    def connected_to(self) -> str | None:
        """The address in use now (without the password), or None before the first connection."""
        if self._connection is None:
            return None
        return describe_url(str(self._connection.url))

    def is_connected(self) -> bool:
        """Whether the robust connection is up now (it clears `connected` while it reconnects)."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def connect(self) -> AbstractRobustConnection:
        """Open the robust connection (once); later calls return it."""
        if self._refused:
            raise BrokerError(f"the transport to {self.where} is closed; open a new one")
        async with self._lock:
            if self._connection is None:
                self._connection = await self._open()
            return self._connection

    def refuse_new_use(self) -> None:
        """From now on `connect` and `channel` raise: the owner is closing."""
        self._refused = True

    async def close(self) -> None:
        """Close the connection; it cannot be opened again."""
        self.refuse_new_use()
        if self._connection is not None:
            with contextlib.suppress(*CONNECTION_LOST, aiormq.exceptions.AMQPError):
                await self._connection.close()
            self._connection = None

    async def _open(self) -> FailoverConnection:
        """Connect to the first reachable address; once connected, a lost node fails over to the next."""
        failures: list[str] = []
        for start in range(len(self.urls)):
            order = self.urls[start:] + self.urls[:start]
            connection = FailoverConnection(
                order,
                reconnect_interval=self._reconnect_interval,
                client_properties={"connection_name": self._connection_name},
            )
            where = describe_url(order[0])
            try:
                await connection.connect(timeout=self._connect_timeout)
            except aiormq.exceptions.ProbableAuthenticationError as e:
                raise BrokerError(
                    f"RabbitMQ refused the login at {where}: check the user exists, the password, "
                    "and that the user has permissions on the vhost (rabbitmqctl list_permissions -p VHOST)"
                ) from e
            except (aiormq.exceptions.AMQPConnectionError, OSError, TimeoutError) as e:
                failures.append(f"{where} ({type(e).__name__}: {e})")
                with contextlib.suppress(Exception):
                    await connection.close()
                continue
            log.debug("connected", broker=where)
            return connection
        tls = " For amqps, check the CA and client certificate files." if self.url.startswith("amqps") else ""
        raise BrokerError(
            f"cannot connect to RabbitMQ at {'; '.join(failures)}; "
            f"is the broker running (chorus-broker status) and is the URL right?{tls}"
        )

    async def channel(self, *, confirms: bool = False) -> AbstractChannel:
        """A new channel; with `confirms`, publisher confirms on and returned messages raised."""
        connection = await self.connect()
        try:
            return await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        except CONNECTION_LOST as e:
            raise ChannelUnavailable(f"cannot open a channel to {self.where}: {e}") from e
        except RuntimeError as e:
            # aiormq's way of saying the underlying connection is already closed (the broker went
            # away and the robust connection has not swapped in a new one yet).
            if "closed" not in str(e):
                raise
            raise ChannelUnavailable(f"the connection to {self.where} is closed; reconnecting") from e
        except asyncio.CancelledError as e:
            if not rpc_cancelled_by_connection_loss():
                raise
            raise ChannelUnavailable(f"lost the connection to {self.where} while opening a channel") from e

    async def guard(self, operation: Awaitable[T], what: str, hint: str = "") -> T:
        """Await `operation` (something the broker may refuse), raising what it says as Chorus errors."""
        try:
            return await operation
        except aiormq.exceptions.ChannelAccessRefused as e:
            raise AccessRefused(
                f"user {self.user!r} may not {what} at {self.where}; check its permissions "
                f"(rabbitmqctl list_permissions -p VHOST){hint}"
            ) from e
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise BrokerError(
                f"cannot {what}: it exists with different settings ({e}); delete it "
                "(rabbitmqctl delete_queue / delete_exchange) or declare it the same way"
            ) from e
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TopologyMissing(f"cannot {what}: {e}; declare the topology first") from e
        except CHANNEL_GONE as e:
            raise BrokerError(f"lost the connection to {self.where} while trying to {what}; retry") from e

    async def check_queue_exists(self, queue: str) -> None:
        """Raise `TopologyMissing` unless `queue` exists (probed on a throwaway channel, since a 404
        closes the channel it happens on)."""
        channel = await self.channel()
        try:
            await (await channel.get_underlay_channel()).queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TopologyMissing(
                f"queue {queue!r} does not exist at {self.where}; start the broker with the Chorus "
                "topology (chorus-broker up) or have the coordinator declare it"
            ) from e
        finally:
            await close_quietly(channel)

    async def check_exchange_exists(self, exchange: str) -> None:
        """Raise `TopologyMissing` unless `exchange` exists (on a throwaway channel)."""
        channel = await self.channel()
        try:
            await (await channel.get_underlay_channel()).exchange_declare(exchange, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TopologyMissing(
                f"exchange {exchange!r} does not exist at {self.where}; declare the topology first"
            ) from e
        finally:
            await close_quietly(channel)
