"""RabbitMQ through aio-pika: the only package of Chorus that imports aio_pika or aiormq.

Laid out as aio-pika is:
- `connection`: the robust connection, its channels, and aiormq's errors turned into Chorus's;
- `publisher`: a channel with publisher confirms that waits out reconnects;
- `subscription`: one consumer on its own channel, its coalesced acks and dead-letter copies;
- `transport`: `AmqpTransport`, the `Transport` seam as a thin front over the three.
"""

from broker.amqp.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_INTERVAL,
    AmqpConnection,
    describe_url,
)
from broker.amqp.subscription import AmqpSubscription, broker_headers
from broker.amqp.transport import AmqpTransport
from broker.errors import AccessRefused, ChannelUnavailable
from broker.topology import exchange_arguments, queue_arguments

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RECONNECT_INTERVAL",
    "AccessRefused",
    "AmqpConnection",
    "AmqpSubscription",
    "AmqpTransport",
    "ChannelUnavailable",
    "broker_headers",
    "describe_url",
    "exchange_arguments",
    "queue_arguments",
]
