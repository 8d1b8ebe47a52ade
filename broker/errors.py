"""Broker failures, all under ChorusError."""

from common.exits import EXIT_USAGE
from schemas.errors import ChorusError


class BrokerError(ChorusError):
    """The broker could not do what was asked; the message says what to check."""


class Unroutable(BrokerError):
    """A publish matched no queue: the message was not stored anywhere."""


class PublishTimeout(BrokerError):
    """The broker did not confirm a publish in time; it may or may not have stored it."""


class TopologyMissing(BrokerError):
    """A queue or exchange that should exist does not (passive declare failed)."""


class QueueFull(BrokerError):
    """A queue at its length limit refused the message (`reject-publish`): it was not stored there."""


class AccessRefused(BrokerError):
    """The broker refused an operation for lack of permission."""


class ChannelUnavailable(BrokerError):
    """No channel could be opened because the connection is down (a robust one is reconnecting)."""


class NodeError(BrokerError):
    """The local node could not be started, stopped or changed; the message says what to do."""


class UsageError(NodeError):
    """The request itself is wrong (bad id, options that contradict the data dir, busy port...)."""

    exit_status = EXIT_USAGE
