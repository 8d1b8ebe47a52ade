"""Broker addresses: one URL, or several for the nodes of a cluster, and what is safe to show of them.

Several addresses are written as a list (settings files), as one string with the URLs separated by
`;` (an environment variable, a command-line flag), or by repeating a flag. They name the same
federation on different nodes, so they must share the scheme, the user and the vhost.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from broker.errors import BrokerError

SEPARATOR = ";"
MEMORY_SCHEME = "memory"
REDACTED = "***"

BrokerUrls = str | Sequence[str]  # one URL, "url1;url2", or a list of either


def broker_urls(value: BrokerUrls) -> tuple[str, ...]:
    """Every address in `value`, in order, checked to name one login on one vhost."""
    parts = [value] if isinstance(value, str) else list(value)
    urls = tuple(url.strip() for part in parts for url in part.split(SEPARATOR) if url.strip())
    if not urls:
        raise BrokerError("no broker URL given; write amqp://USER:PASSWORD@HOST:PORT/VHOST")
    if len(urls) > 1:
        _check_same_login(urls)
    return urls


def check_broker_urls(value: BrokerUrls) -> None:
    """For settings validation: raise ValueError (not BrokerError) when `value` is no usable address list."""
    try:
        broker_urls(value)
    except BrokerError as e:
        raise ValueError(str(e)) from None


def _check_same_login(urls: Sequence[str]) -> None:
    first = urlsplit(urls[0])
    if first.scheme == MEMORY_SCHEME:
        raise BrokerError("the embedded memory:// broker has one address; give a single memory:// URL")
    for url in urls[1:]:
        other = urlsplit(url)
        for what, mine, theirs in (
            ("scheme", first.scheme, other.scheme),
            ("user", unquote(first.username or ""), unquote(other.username or "")),
            ("vhost", first.path, other.path),
        ):
            if mine != theirs:
                raise BrokerError(
                    f"broker URLs {redact_password(urls[0])} and {redact_password(url)} differ in {what} "
                    f"({mine!r} vs {theirs!r}); several addresses must be the nodes of one cluster, "
                    "reached with the same login and vhost"
                )


def is_memory(value: BrokerUrls) -> bool:
    """Whether `value` names the embedded memory broker."""
    return urlsplit(broker_urls(value)[0]).scheme == MEMORY_SCHEME


def redact_password(url: str) -> str:
    """`url` with its password (if any) replaced by ***: safe for logs, records and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))


def redact_passwords(value: BrokerUrls) -> str:
    """Every address of `value`, passwords redacted, `;`-separated."""
    return SEPARATOR.join(redact_password(url) for url in broker_urls(value))
