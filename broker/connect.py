"""Open a `Transport` from a URL: `memory://USER` (embedded) or `amqp://` / `amqps://` (RabbitMQ).

TLS for amqps: pass `ca_file` (and `cert_file` + `key_file` when the broker asks
for a client certificate), or put `cafile=`, `certfile=`, `keyfile=` in the URL's
query string.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from broker.addresses import MEMORY_SCHEME, BrokerUrls, broker_urls
from broker.amqp import AmqpTransport
from broker.errors import BrokerError
from broker.memory import MemoryBroker
from broker.transport import Transport

AMQP_SCHEMES = ("amqp", "amqps")


def open_transport(
    url: BrokerUrls,
    *,
    user: str | None = None,
    memory_broker: MemoryBroker | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    connection_name: str = "chorus",
) -> Transport:
    """A transport for `url`, not yet connected: use it as `async with open_transport(...) as t`.

    `memory://` needs `memory_broker` and a user (`user=` or `memory://USER`).
    `amqp://USER:PASSWORD@HOST:PORT/VHOST` takes the user from the URL; a `user`
    given as well must match it. Several amqp addresses (a list, or `;`-separated) are the nodes of
    one cluster: the first reachable one is used, and the others on connection loss.
    """
    urls = broker_urls(url)
    parts = urlsplit(urls[0])
    if parts.scheme == MEMORY_SCHEME:
        return _memory_transport(parts.netloc, user, memory_broker)
    if parts.scheme in AMQP_SCHEMES:
        url_user = unquote(parts.username) if parts.username else None
        if url_user is None:
            raise BrokerError(
                f"broker URL has no user; write it as {parts.scheme}://USER:PASSWORD@HOST:PORT/VHOST"
            )
        if user is not None and user != url_user:
            raise BrokerError(f"user {user!r} does not match the broker URL's user {url_user!r}")
        tls_urls = [_with_tls_files(u, ca_file=ca_file, cert_file=cert_file, key_file=key_file) for u in urls]
        return AmqpTransport(tls_urls, connection_name=connection_name)
    raise BrokerError(
        f"unsupported broker URL scheme {parts.scheme!r}; use memory://USER, amqp://... or amqps://..."
    )


def _memory_transport(netloc: str, user: str | None, broker: MemoryBroker | None) -> Transport:
    if broker is None:
        raise BrokerError("a memory:// URL needs the MemoryBroker object: pass memory_broker=")
    name = user or unquote(netloc.rpartition("@")[2]) or None
    if name is None:
        raise BrokerError("a memory:// URL needs a user: memory://USER or user=")
    return broker.connect(name)


def _with_tls_files(
    url: str, *, ca_file: str | Path | None, cert_file: str | Path | None, key_file: str | Path | None
) -> str:
    files = {"cafile": ca_file, "certfile": cert_file, "keyfile": key_file}
    given = {key: str(value) for key, value in files.items() if value is not None}
    if not given:
        return url
    parts = urlsplit(url)
    if parts.scheme != "amqps":
        raise BrokerError(f"TLS files given for a {parts.scheme}:// URL; use amqps:// (port 5671 by default)")
    if ("certfile" in given) != ("keyfile" in given):
        raise BrokerError("a client certificate needs both cert_file and key_file")
    for path in given.values():
        if not Path(path).is_file():
            raise BrokerError(f"TLS file {path} does not exist")
    query = dict(parse_qsl(parts.query))
    query.update(given)
    return urlunsplit(parts._replace(query=urlencode(query)))
