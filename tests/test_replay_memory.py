"""chorus-replay reads a record log a frame at a time: a frame over the frame limit is checked and
reported, not loaded, and what is kept of the frames it loads holds no bodies."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from broker.record_format import FrameScan, read_frame
from broker.recorder import Recorder
from broker.transport import Delivery
from coordinator.replay.cli import main
from coordinator.replay.log import interpret, load_log
from coordinator.replay.report import inspect_text
from schemas.codec import encode
from schemas.messages import AdapterUpdate, Answer, GenerationBatch, Tensor

LIMIT = 64 * 1024
BIG = 300 * 1024


def batch(number: int) -> bytes:
    return encode(
        GenerationBatch(
            federation="test",
            round_id=1,
            message_id=f"m{number}",
            participant_id="alice",
            shard_id=0,
            model_id="x",
            answers=[Answer(prompt_id=f"p{number}", text=f"answer {number}")],
        )
    )


def adapter(size: int) -> bytes:
    tensor = Tensor(name="lora.A", dtype="float32", shape=[size // 4], data=bytes(size))
    return encode(
        AdapterUpdate(
            federation="test",
            round_id=1,
            message_id="big",
            participant_id="alice",
            tensors=[tensor],
            num_samples=1,
        )
    )


def receive(recorder: Recorder, routing_key: str, body: bytes, message_id: str) -> None:
    delivery = Delivery(
        body=body,
        exchange="chorus.up",
        routing_key=routing_key,
        message_id=message_id,
        user_id="alice",
        redelivered=False,
    )
    recorder.record_received(delivery, received_unix=1.0, settle="ack")


def write_log(directory: Path, big_bytes: int, small: int = 20) -> tuple[Path, int]:
    """`small` batches, the big adapter upload in the middle; returns the file and the big frame's offset."""
    with Recorder(directory, federation="test", settings={}, fsync="never") as recorder:
        for number in range(small):
            if number == small // 2:
                receive(recorder, "ctl.alice", adapter(big_bytes), "big")
            receive(recorder, "gen.0.alice", batch(number), f"m{number}")
        (path,) = recorder.files
    scan = FrameScan(path)
    offsets = [offset for offset, frame in scan.messages() if frame.message_id == "big"]
    return path, offsets[0]


def test_a_frame_over_the_limit_is_reported_and_the_frames_after_it_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, offset = write_log(tmp_path / "records", BIG)
    log = load_log([path], max_frame_bytes=LIMIT)
    (skipped,) = log.skipped
    assert log.damage == () and skipped.offset == offset and skipped.payload_bytes > BIG
    assert len(log.frames) == 20  # every batch, before and after the big frame
    reason = (
        f"frame at byte {offset} skipped: its payload is {skipped.payload_bytes} bytes, over the {LIMIT}-byte"
    )
    assert reason in str(skipped)

    assert main(["inspect", str(path), "--max-frame-bytes", str(LIMIT)]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1 frames over the frame limit, checked but not loaded" in out and reason in out
    assert main(["inspect", str(path), "--max-frame-bytes", str(LIMIT), "--strict"]) == 1
    assert "1 skipped frames (--strict)" in capsys.readouterr().err

    assert main(["inspect", str(path)]) == 0  # under the default limit it is read like any frame
    assert "skipped" not in capsys.readouterr().out


def test_a_skipped_frame_is_still_checked_for_damage(tmp_path: Path) -> None:
    path, offset = write_log(tmp_path / "records", BIG)
    data = bytearray(path.read_bytes())
    data[offset + BIG // 2] ^= 0x01
    path.write_bytes(bytes(data))
    log = load_log([path], max_frame_bytes=LIMIT)
    (damage,) = log.damage
    assert damage.offset == offset and "checksum mismatch" in damage.problem and log.skipped == ()
    assert len(log.frames) == 10  # the batches before it

    path.write_bytes(bytes(data[: offset + BIG // 2]))  # cut inside the skipped frame
    (damage,) = load_log([path], max_frame_bytes=LIMIT).damage
    assert damage.offset == offset and "truncated" in damage.problem


def test_a_log_is_held_without_its_bodies_and_a_body_is_read_again_when_needed(tmp_path: Path) -> None:
    big = 8 * 1024 * 1024
    path, offset = write_log(tmp_path / "records", big, small=200)
    tracemalloc.start()
    try:
        log = load_log([path])
        recording = interpret(log)
        text = inspect_text(log, recording)
        _, peak = tracemalloc.get_traced_memory()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Reading holds the big frame's payload once and decodes its tensor once; nothing holds it after.
    assert peak < 2.5 * big, f"peak {peak} bytes to read a log whose largest body is {big}"
    assert held < big / 4, f"{held} bytes held after reading"
    assert "alice" in text and len(log.frames) == 201
    (frame,) = [f for f in log.frames if f.message_id == "big"]
    assert not hasattr(frame, "body") and frame.body_size > big
    assert bytes(frame.load().body) == adapter(big) == bytes(read_frame(path, offset).body)
