"""Several broker addresses: how they are written and checked, and the first reachable one winning."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from broker.addresses import broker_urls, is_memory, redact_password, redact_passwords
from broker.amqp import AmqpTransport
from broker.errors import BrokerError
from broker.topology import COORDINATOR_USER

A = "amqp://ana:pw@node-a:5672/chorus"
B = "amqp://ana:pw@node-b:5673/chorus"


def test_one_url_a_list_and_a_semicolon_string_name_the_same_addresses() -> None:
    assert broker_urls(A) == (A,)
    assert broker_urls([A, B]) == broker_urls(f"{A};{B}") == broker_urls(f" {A} ; {B} ;") == (A, B)
    assert broker_urls([f"{A};{B}"]) == (A, B)


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("", "no broker URL given"),
        ([A, "amqps://ana:pw@node-b:5671/chorus"], "differ in scheme"),
        ([A, "amqp://ben:pw@node-b:5672/chorus"], "differ in user"),
        ([A, "amqp://ana:pw@node-b:5672/other"], "differ in vhost"),
        (["memory://ana", "memory://ana"], "memory:// broker has one address"),
    ],
)
def test_addresses_that_cannot_be_one_cluster_login_are_refused(urls: str | list[str], message: str) -> None:
    with pytest.raises(BrokerError, match=message) as caught:
        broker_urls(urls)
    assert "pw@" not in str(caught.value)  # never the password


def test_passwords_are_redacted_in_every_address() -> None:
    assert redact_passwords([A, B]) == "amqp://ana:***@node-a:5672/chorus;amqp://ana:***@node-b:5673/chorus"
    assert redact_password("amqp://node:5672/") == "amqp://node:5672/"
    assert is_memory("memory://ana") and not is_memory([A, B])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


@pytest.mark.amqp
async def test_the_first_reachable_address_wins(rabbit_vhost: Callable[..., dict[str, str]]) -> None:
    live = rabbit_vhost()[COORDINATOR_USER]
    dead = live.replace(live.split("@")[1].split("/")[0], f"127.0.0.1:{closed_port()}")
    transport = AmqpTransport([dead, live], connect_timeout=5.0)
    async with transport:
        await transport.connection.connect()
        where = transport.connection.connected_to
        assert where is not None and live.split("@")[1].split("/")[0] in where


@pytest.mark.amqp
async def test_no_reachable_address_names_each_one_tried() -> None:
    urls = [f"amqp://ana:secret@127.0.0.1:{closed_port()}/chorus" for _ in range(2)]
    transport = AmqpTransport(urls, connect_timeout=2.0)
    with pytest.raises(BrokerError) as caught:
        await transport.connection.connect()
    message = str(caught.value)
    assert all(url.split("@")[1].split("/")[0] in message for url in urls)
    assert "secret" not in message and "is the broker running" in message
