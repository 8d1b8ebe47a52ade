"""Wrap the coordinator's transport in a recorder when its settings ask for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from broker.addresses import redact_passwords
from broker.recorder import Recorder, RecordingTransport
from broker.transport import Transport
from coordinator.settings import CoordinatorSettings


def with_recording(transport: Transport, settings: CoordinatorSettings) -> Transport:
    """`transport` itself when recording is off, else a `RecordingTransport` around it.

    Use the result as the context manager (`async with with_recording(open_transport(...), s)`):
    it enters the inner transport and opens the recorder.
    """
    table = settings.recording
    if not table.enabled:
        return transport
    recorder = Recorder(
        Path(table.directory),
        federation=settings.federation,
        settings=recorded_settings(settings),
        rotate_bytes=table.rotate_bytes,
        fsync=table.fsync,
        rejected_frames_per_sender=table.rejected_frames_per_sender,
    )
    return RecordingTransport(transport, recorder)


def recorded_settings(settings: CoordinatorSettings) -> dict[str, Any]:
    """The settings as plain data for a log header, with any password in the broker URL redacted."""
    plain: dict[str, Any] = msgspec.to_builtins(settings)
    plain["broker_url"] = redact_passwords(settings.broker_url)
    return plain
