"""The recorder: a transport decorator that logs every message in and out, with settle outcomes."""

from __future__ import annotations

import asyncio
import errno
import gc
import io
import weakref
from pathlib import Path

import msgspec
import pytest
from support.recorded import record_federation

from broker.addresses import redact_password
from broker.errors import Unroutable
from broker.memory import MemoryBroker
from broker.record_format import FORMAT_VERSION, MessageFrame, read_log_file
from broker.recorder import (
    HEADERS_CUT_KEY,
    RECEIVED_HEADER_BYTES,
    UNREAD,
    Recorder,
    RecordingTransport,
    ack_unread,
)
from broker.transport import (
    DEAD_LETTER_BODY_BYTES,
    REASON_HEADER,
    BindingSpec,
    Delivery,
    ExchangeSpec,
    QueueSpec,
    Topology,
)
from coordinator.replay.log import load_log
from coordinator.replay.recording import recorded_settings
from coordinator.settings import CoordinatorSettings

TOPOLOGY = Topology(
    exchanges=(ExchangeSpec("up", "topic"), ExchangeSpec("chorus.dlx", "direct")),
    queues=(
        QueueSpec(
            "work", delivery_limit=5, dead_letter_exchange="chorus.dlx", dead_letter_routing_key="dead"
        ),
        QueueSpec("chorus.dead"),
    ),
    bindings=(BindingSpec("work", "up", "job.*"), BindingSpec("chorus.dead", "chorus.dlx", "dead")),
)


def frames_of(recorder: Recorder) -> list[MessageFrame]:
    return [frame for path in recorder.files for frame in read_log_file(path).frames]


def make_recorder(directory: Path, **options: object) -> Recorder:
    return Recorder(directory, federation="fed", settings={"answer": 42}, **options)  # type: ignore[arg-type]


async def test_every_message_in_and_out_is_recorded_with_its_settlement(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(TOPOLOGY)
    recorder = make_recorder(tmp_path)
    seen: list[str] = []
    failed_once: set[str] = set()

    async def handler(delivery: Delivery) -> None:
        action = delivery.body.decode()
        seen.append(action)
        if action == "poison":
            await delivery.dead_letter("poison: cannot use this")
        elif action == "flaky" and action not in failed_once:
            failed_once.add(action)
            raise RuntimeError("transient")  # the transport requeues it
        elif action == "stuck":
            await asyncio.sleep(10)  # still running when the connection closes
        # anything else returns without settling: the transport acks it

    async with RecordingTransport(broker.connect("coordinator"), recorder) as transport:
        await transport.consume("work", handler)
        publisher = broker.connect("alice")
        for body in (b"fine", b"poison", b"flaky", b"stuck"):
            await publisher.publish("up", "job.alice", body, message_id=body.decode(), headers={"h": 1})
        await transport.publish("up", "job.coordinator", b"from me", message_id="mine")
        await transport.publish("up", "job.a", b"bcc", message_id="many", bcc=["job.b", "nowhere"])
        with pytest.raises(Unroutable):
            await transport.publish("up", "nowhere", b"lost", message_id="lost")
        for _ in range(20):
            await asyncio.sleep(0)
    assert not recorder.is_open

    frames = frames_of(recorder)
    received = {(f.message_id, f.settle, f.reason, f.redelivered) for f in frames if f.direction == "in"}
    assert received >= {
        ("fine", "ack", "", False),
        ("poison", "dead_letter", "poison: cannot use this", False),
        ("flaky", "requeue", "", False),
        ("flaky", "ack", "", True),
        ("stuck", "abandoned", "", False),
        ("mine", "ack", "", False),  # our own publish, consumed too
        ("many", "ack", "", False),
    }
    assert sum(f.message_id == "many" for f in frames if f.direction == "in") == 1  # one copy in "work"
    fine = next(f for f in frames if f.message_id == "fine")
    assert (fine.body, fine.user_id, fine.exchange, fine.routing_key) == (b"fine", "alice", "up", "job.alice")
    assert fine.headers["h"] == 1
    sent = {(f.message_id, f.user_id, f.error.split(":")[0]) for f in frames if f.direction == "out"}
    assert sent == {
        ("mine", "coordinator", ""),
        ("many", "coordinator", ""),
        ("lost", "coordinator", "Unroutable"),
    }
    # A BCC publish is one frame per key.
    assert [f.routing_key for f in frames if f.direction == "out" and f.message_id == "many"] == [
        "job.a",
        "job.b",
        "nowhere",
    ]
    header = read_log_file(recorder.files[0]).header
    assert header is not None and header.format == FORMAT_VERSION and header.settings == {"answer": 42}


async def test_rejected_coordinator_messages_are_in_the_log_with_reasons(tmp_path: Path) -> None:
    run = await record_federation(tmp_path, rounds=1)
    frames = load_log([run.records]).frames
    rejected = [f for f in frames if f.settle == "dead_letter"]
    assert [f.routing_key for f in rejected] == ["gen.0.mallory", "gen.0.mallory"]
    assert all(f.user_id == "mallory" and f.reason for f in rejected)
    assert any("does not match participant_id 'alice'" in f.reason for f in rejected)
    published = [f for f in frames if f.direction == "out"]
    assert published and all(f.user_id == "coordinator" and not f.error for f in published)


@pytest.mark.parametrize("fsync", ["never", "rotate", "always"])
def test_rotation_starts_new_files_each_with_a_header(tmp_path: Path, fsync: str) -> None:
    with make_recorder(tmp_path, rotate_bytes=4096, fsync=fsync) as recorder:
        for number in range(40):
            recorder.record_published(
                "up", "k", bytes(300), message_id=str(number), user_id="c", headers=None, published_unix=1.0
            )
    assert len(recorder.files) >= 3
    logs = [read_log_file(path) for path in recorder.files]
    assert [log.header.file_index for log in logs if log.header] == list(range(len(logs)))
    assert len({log.header.session for log in logs if log.header}) == 1
    assert all(log.damage is None for log in logs)
    assert all(log.size < 4096 + 1024 for log in logs)
    assert [f.message_id for f in frames_of(recorder)] == [str(n) for n in range(40)]
    assert recorder.frames == 40 and recorder.bytes_written == sum(log.size for log in logs)


class FullDisk(io.RawIOBase):
    """A file whose every write fails the way a full disk does."""

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_disk_stops_recording_without_stopping_the_service(tmp_path: Path) -> None:
    recorder = make_recorder(tmp_path)
    recorder.open()
    recorder.record_published("up", "k", b"1", message_id="1", user_id="c", headers=None, published_unix=1.0)
    recorder._file.close()  # type: ignore[union-attr]
    recorder._file = FullDisk()  # type: ignore[assignment]  # the disk fills up under the recorder
    recorder.record_published("up", "k", b"2", message_id="2", user_id="c", headers=None, published_unix=1.0)
    recorder.record_published("up", "k", b"3", message_id="3", user_id="c", headers=None, published_unix=1.0)
    assert not recorder.is_open and recorder.dropped == 2 and recorder.frames == 1
    recorder.close()  # closing a failed recorder is fine
    assert len(read_log_file(recorder.files[0]).frames) == 1


def test_recorded_settings_round_trip_without_the_password(tmp_path: Path) -> None:
    settings = CoordinatorSettings(prompts_path="p.jsonl", broker_url="amqps://coord:s3cret@mq:5671/chorus")
    plain = recorded_settings(settings)
    assert plain["broker_url"] == "amqps://coord:***@mq:5671/chorus"
    assert msgspec.convert(plain, CoordinatorSettings).recording == settings.recording
    assert redact_password("amqp://mq:5672/") == "amqp://mq:5672/"


def test_unencodable_header_values_are_kept_as_text(tmp_path: Path) -> None:
    from decimal import Decimal

    with make_recorder(tmp_path) as recorder:
        delivery = Delivery(
            body=b"x",
            exchange="up",
            routing_key="k",
            message_id="m",
            user_id=None,
            redelivered=False,
            headers={"x-price": Decimal("1.5"), REASON_HEADER: "why"},
        )
        recorder.record_received(delivery, received_unix=1.0, settle="ack")
    (frame,) = frames_of(recorder)
    assert frame.headers == {"x-price": "1.5", REASON_HEADER: "why"} and frame.user_id is None


async def test_what_is_not_read_is_recorded_cut_and_no_delivery_outlives_its_settling(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(TOPOLOGY)
    recorder = make_recorder(tmp_path)
    big = b"x" * (DEAD_LETTER_BODY_BYTES * 10)
    headers: dict[str, str | int] = {"small": 1, "pad": "h" * RECEIVED_HEADER_BYTES, "after": 2}
    settled: list[weakref.ref[Delivery]] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.message_id == "unread":
            await ack_unread(delivery)
        elif delivery.message_id == "refused":
            await delivery.dead_letter("too big")
        else:
            await delivery.ack()
        settled.append(weakref.ref(delivery))

    gc.disable()  # what only the cyclic collector would free stays
    try:
        async with RecordingTransport(broker.connect("coordinator"), recorder) as transport:
            await transport.consume("work", handler)
            publisher = broker.connect("alice")
            for message_id in ("unread", "refused", "read"):
                await publisher.publish("up", "job.alice", big, message_id=message_id, headers=headers)
            for _ in range(20):
                await asyncio.sleep(0)
        assert len(settled) == 3 and all(ref() is None for ref in settled)
    finally:
        gc.enable()

    frames = {f.message_id: f for f in frames_of(recorder) if f.direction == "in"}
    unread, refused, read = frames["unread"], frames["refused"], frames["read"]
    assert (unread.settle, unread.reason) == ("ack", UNREAD)
    for cut in (unread, refused):
        assert cut.body == big[:DEAD_LETTER_BODY_BYTES] and cut.body_bytes == len(big)
    assert read.body == big and read.body_bytes == 0  # what the consumer took is recorded whole
    # Headers, whoever sent them, are kept up to RECEIVED_HEADER_BYTES: the rest is counted.
    assert all(f.headers == {"small": 1, "after": 2, HEADERS_CUT_KEY: 1} for f in (unread, read))
