"""chorus-replay: a recorded federation replays offline to the published labels, and drives a coordinator."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import msgpack  # type: ignore[import-untyped]
import msgspec
import pytest
import structlog
from support.recorded import (
    NAMES,
    SHARDS,
    RecordedRun,
    answers,
    coordinator_for,
    published_labels,
    record_federation,
)

from broker.amqp import AmqpTransport
from broker.memory import MemoryBroker
from broker.topology import COORDINATOR_USER, full_topology
from common.embedding import HashingEmbedder
from common.rouge import rouge_l
from coordinator.replay.cli import main
from coordinator.replay.consensus import ConsensusOverrides, replay_consensus, replay_settings
from coordinator.replay.label_sources import label_quality_of_run
from coordinator.replay.log import ReplayError, interpret, load_log
from coordinator.replay.publish import (
    RepublishReport,
    amqp_connector,
    load_credentials,
    plan_republish,
    republish,
)
from coordinator.service import build_coordinator
from schemas.codec import decode_reply
from schemas.messages import PseudoLabels


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`main()` points structlog at the captured stderr; put the configuration back afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    return asyncio.run(record_federation(tmp_path_factory.mktemp("federation")))


def frame_offsets(path: Path) -> list[int]:
    """Byte offset of every frame of a log file, found independently of the reader under test."""
    unpacker = msgpack.Unpacker(io.BytesIO(path.read_bytes()), raw=False)
    offsets = [0]
    for _ in unpacker:
        offsets.append(unpacker.tell())
    return offsets[:-1]


def only_file(records: Path) -> Path:
    (path,) = sorted(records.iterdir())
    return path


def test_offline_replay_gives_the_published_labels_byte_for_byte(recorded: RecordedRun) -> None:
    log = load_log([recorded.records])
    assert log.damage == () and log.settings is not None
    assert log.settings.broker_url == "amqp://coordinator:***@localhost:5672/chorus"  # no password kept
    replay = replay_consensus(interpret(log), log.settings, embedder=HashingEmbedder())
    assert len(replay.shards) == 2 * SHARDS
    assert {(s.round_id, s.shard_id): s.replayed for s in replay.shards} == recorded.labels
    assert all(s.identical for s in replay.shards) and replay.changes == ()


def test_cli_replay_is_deterministic_and_writes_comparable_bytes(
    recorded: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["consensus", str(recorded.records), "--write", str(tmp_path), "--check"]) == 0
    first = capsys.readouterr().out
    assert main(["consensus", str(recorded.records), "--index", "exact"]) == 0
    assert main(["consensus", str(recorded.records)]) == 0
    again = capsys.readouterr().out.split("consensus replay with index=hnsw")[1]
    assert first.split("consensus replay with index=hnsw")[1] == again  # same log, same settings, same text
    assert "prompts changed: 0 of 12" in first
    for (round_id, shard_id), body in recorded.labels.items():
        name = f"test.r{round_id}.s{shard_id}.labels.msgpack"
        assert (tmp_path / "replayed" / name).read_bytes() == body
        assert (tmp_path / "recorded" / name).read_bytes() == body


def test_another_threshold_reports_which_prompts_changed(
    recorded: RecordedRun, capsys: pytest.CaptureFixture[str]
) -> None:
    log = load_log([recorded.records])
    assert log.settings is not None
    strict = replay_settings(log.settings, ConsensusOverrides(min_confidence=0.8))
    replay = replay_consensus(interpret(log), strict, embedder=HashingEmbedder())
    changed = replay.changes
    assert 0 < len(changed) < replay.prompts
    assert all(c.recorded is not None and c.replayed is None for c in changed)
    assert all("below min_confidence 0.8" in c.replayed_abstain_reason for c in changed)

    assert main(["consensus", str(recorded.records), "--min-confidence", "0.8", "--check"]) == 1
    out = capsys.readouterr().out
    assert f"prompts changed: {len(changed)} of 12" in out
    for change in changed:
        assert f"round {change.round_id} shard {change.shard_id} prompt {change.prompt_id}" in out
        assert change.recorded is not None and json.dumps(change.recorded.text) in out


def test_quorum_override_re_decides_answered_sets_from_arrival_times(recorded: RecordedRun) -> None:
    log = load_log([recorded.records])
    assert log.settings is not None
    everyone = replay_settings(log.settings, ConsensusOverrides(quorum=1.0))  # a fraction: all five
    replay = replay_consensus(interpret(log), everyone, embedder=HashingEmbedder())
    assert all(s.answered == tuple(NAMES) and s.identical for s in replay.shards)
    with pytest.raises(ReplayError, match="quorum"):
        replay_settings(log.settings, ConsensusOverrides(quorum=-1))


def test_inspect_lists_rounds_participants_and_rejections_with_reasons(
    recorded: RecordedRun, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(recorded.records), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "rejected messages: 2" in out
    assert "user_id 'mallory' does not match participant_id 'alice'" in out
    assert "schema malformed" in out
    mallory = next(line for line in out.splitlines() if line.strip().startswith("mallory"))
    assert mallory.split()[:2] == ["mallory", "2"]
    rounds = [line.split() for line in out.splitlines() if line.strip()[:2] in ("1 ", "2 ")]
    assert [row[:3] for row in rounds[:2]] == [["1", "5", "5"], ["2", "5", "5"]]


# ---- label quality against references --------------------------------------------------


def reference_for(prompt_id: str) -> str | None:
    """Bob and carol's minority answer is the reference on every third prompt, so there the label
    (the majority's) loses to the oracle; q17 has none (it is left unscored)."""
    number = int(prompt_id.lstrip("q"))
    if number == 17:
        return None
    if number % 3 == 0:
        return f"Honestly {prompt_id} depends on context."
    return f"For {prompt_id}, the answer is the standard one."


def write_references(path: Path, prompts: int = 24) -> Path:
    lines = [
        json.dumps({"prompt_id": f"q{i}", "family": "f", "response": reference_for(f"q{i}")})
        for i in range(prompts)
        if reference_for(f"q{i}") is not None
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def expected_quality(labels: dict[tuple[int, int], bytes]) -> dict[str, tuple[int, float, float, float, int]]:
    """Round ("1", "2", "all") -> (labelled, label, members' mean, oracle, label beat the mean),
    worked out from the published labels and the scripted answers of all five members."""
    scores: dict[str, list[tuple[float, float, float]]] = {}
    for (round_id, _), body in sorted(labels.items()):
        message = decode_reply(body)
        assert isinstance(message, PseudoLabels) and message.abstained == []
        for label in message.labels:
            reference = reference_for(label.prompt_id)
            if reference is None:
                continue
            members = [rouge_l(answers(name, label.prompt_id), reference) for name in NAMES]
            score = (rouge_l(label.text, reference), sum(members) / len(members), max(members))
            scores.setdefault(str(round_id), []).append(score)
            scores.setdefault("all", []).append(score)
    return {
        name: (
            len(rows),
            sum(r[0] for r in rows) / len(rows),
            sum(r[1] for r in rows) / len(rows),
            sum(r[2] for r in rows) / len(rows),
            sum(1 for r in rows if r[0] > r[1]),
        )
        for name, rows in scores.items()
    }


def quality_rows(out: str, title: str) -> dict[str, list[str]]:
    """The rows of the label-quality table under `title`, by their first cell."""
    lines = out.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[1:]) if cells[0] != "not"}


def test_references_add_a_label_quality_table_per_round(
    recorded: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    references = write_references(tmp_path / "public_references.jsonl")
    assert main(["consensus", str(recorded.records), "--references", str(references)]) == 0
    out = capsys.readouterr().out
    expected = expected_quality(recorded.labels)
    assert set(expected) == {"1", "2", "all"} and expected["all"][0] == 11  # 12 labelled, q17 unscored
    assert expected["all"][3] > expected["all"][2]  # the minority was right somewhere: a real oracle gap
    for title in ("replayed labels", "recorded labels"):  # the same labels here: the same table twice
        rows = quality_rows(out, title)
        assert set(rows) == set(expected)
        for name, (labelled, label, mean, oracle, beat) in expected.items():
            abstained = 0
            assert rows[name] == [
                str(labelled),
                str(abstained),
                f"{label:.3f}",
                f"{mean:.3f}",
                f"{oracle:.3f}",
                f"{beat}/{labelled}",
            ], (title, name)
    assert "not scored (no reference, or nobody answered): 1 prompts" in out


def test_references_show_what_a_stricter_replay_gives_up(
    recorded: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    references = write_references(tmp_path / "refs.jsonl")
    arguments = ["consensus", str(recorded.records), "--references", str(references)]
    assert main([*arguments, "--min-confidence", "0.8"]) == 0
    out = capsys.readouterr().out
    changed = re.findall(r"^  round \d+ shard \d+ prompt (\S+)$", out, re.MULTILINE)
    withheld = len([prompt_id for prompt_id in changed if reference_for(prompt_id) is not None])
    assert withheld > 0
    replayed = quality_rows(out, "replayed labels")["all"]
    published = quality_rows(out, "recorded labels")["all"]
    # every change is a label the replay withheld; q17 (no reference) is not scored on either side
    assert published[:2] == ["11", "0"]
    assert replayed[:2] == [str(11 - withheld), str(withheld)]


def test_a_finished_runs_store_gives_the_same_label_quality(recorded: RecordedRun, tmp_path: Path) -> None:
    references = write_references(tmp_path / "refs.jsonl")
    quality = label_quality_of_run(Path(recorded.settings.state_path), references)
    expected = expected_quality(recorded.labels)
    summaries = {str(r): s for r, s in quality.rounds.items()} | {"all": quality.overall}
    assert set(summaries) == set(expected)
    for name, (labelled, label, mean, oracle, beat) in expected.items():
        summary = summaries[name]
        assert (summary.labelled, summary.abstained, summary.beat_mean) == (labelled, 0, beat)
        assert (summary.label, summary.members_mean, summary.oracle) == pytest.approx((label, mean, oracle))
    assert [prompt_id for _, prompt_id in quality.unscored] == ["q17"]


def test_bad_references_are_reported_before_any_replay(
    recorded: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    assert main(["consensus", str(recorded.records), "--references", str(missing)]) == 2
    assert f"references file {missing} does not exist" in capsys.readouterr().err
    bad = tmp_path / "refs.jsonl"
    bad.write_text(json.dumps({"prompt_id": "q1", "response": "x"}) + "\n" + json.dumps({"prompt_id": "q2"}))
    assert main(["consensus", str(recorded.records), "--references", str(bad)]) == 2
    captured = capsys.readouterr()
    assert f'{bad}:2: no "response" (or "reference") field' in captured.err
    assert captured.out == ""  # nothing replayed


@dataclass
class FreshRun:
    labels: dict[tuple[int, int], bytes]
    dead_lettered: int
    report: RepublishReport


async def drive_fresh_coordinator(
    original: RecordedRun, tmp_path: Path, **republish_options: Any
) -> FreshRun:
    """A new coordinator (empty state, the recorded settings) fed by `republish` on a memory broker."""
    broker = MemoryBroker()
    broker.declare(full_topology([*NAMES, "mallory"]))
    settings = msgspec.structs.replace(
        original.settings,
        state_path=str(tmp_path / "fresh.sqlite3"),
        recording=msgspec.structs.replace(original.settings.recording, directory=str(tmp_path / "fresh")),
    )
    coordinator = coordinator_for(settings, broker)
    plan = plan_republish(interpret(load_log([original.records])))
    async with coordinator.transport:
        await coordinator.start()
        drive = asyncio.create_task(coordinator.drive())
        report = await republish(plan, broker.connect, **republish_options)
        await asyncio.wait_for(drive, 20.0)
        await coordinator.stop_intake()
    labels = published_labels(coordinator)
    coordinator.store.close()
    assert report.published == len(plan.messages) and not report.failed
    return FreshRun(labels, coordinator.counters.dead_lettered, report)


async def test_republished_log_drives_a_fresh_coordinator_to_the_same_labels(tmp_path: Path) -> None:
    # Participants answer 0.3 s after each announcement, so that at the recorded pace a fresh
    # coordinator has opened each round before its batches arrive.
    original = await record_federation(tmp_path / "original", delay=0.3)
    plan = plan_republish(interpret(load_log([original.records])))
    assert plan.skipped == {"malformed": 1}
    assert plan.users == sorted([*NAMES, "mallory"])  # the forgery goes out as mallory, as recorded
    fresh = await drive_fresh_coordinator(original, tmp_path, speed=1.0)
    assert fresh.labels == original.labels
    assert fresh.dead_lettered == 1  # the forgery, rejected again
    fresh_log = load_log([tmp_path / "fresh"])  # the fresh coordinator's own recording
    replay = replay_consensus(interpret(fresh_log), original.settings, embedder=HashingEmbedder())
    assert all(s.identical for s in replay.shards) and len(replay.shards) == 2 * SHARDS


async def test_following_rounds_lets_a_replay_run_flat_out(recorded: RecordedRun, tmp_path: Path) -> None:
    # At full speed the batches would reach the coordinator before it opens their round; following
    # the announcements holds each round's answers until then.
    fresh = await drive_fresh_coordinator(recorded, tmp_path, speed=0, follow_rounds=True)
    assert fresh.labels == recorded.labels
    assert fresh.report.rounds_not_opened == [] and fresh.dead_lettered == 1


def test_truncated_log_is_read_up_to_the_cut(
    recorded: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / only_file(recorded.records).name
    data = only_file(recorded.records).read_bytes()
    offsets = frame_offsets(only_file(recorded.records))
    path.write_bytes(data[:-5])
    log = load_log([path])
    (damage,) = log.damage
    assert damage.offset == offsets[-1] and "truncated" in damage.problem
    assert len(log.frames) == len(offsets) - 2  # all but the header and the cut frame
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"byte {offsets[-1]}: the file ends inside this frame (truncated)" in out
    assert main(["inspect", str(path), "--strict"]) == 1
    assert main(["consensus", str(path)]) == 0  # what survives still replays
    assert f"bad frame at byte {offsets[-1]}" in capsys.readouterr().err


def test_corrupted_frame_stops_the_file_there(
    recorded: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = only_file(recorded.records)
    offsets = frame_offsets(source)
    damaged = bytearray(source.read_bytes())
    bad = 20
    damaged[(offsets[bad] + offsets[bad + 1]) // 2] ^= 0x20
    path = tmp_path / source.name
    path.write_bytes(bytes(damaged))
    log = load_log([path])
    (damage,) = log.damage
    assert damage.offset == offsets[bad] and "corrupt" in damage.problem
    assert len(log.frames) == bad - 1
    assert main(["consensus", str(path), "--strict"]) == 1
    captured = capsys.readouterr()
    assert f"bad frame at byte {offsets[bad]}" in captured.err and "checksum mismatch" in captured.err

    path.write_bytes(b"\xc1" + source.read_bytes())  # not even msgpack from the first byte
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no readable record log" in err and "bad frame at byte 0: not msgpack" in err


async def test_rotated_files_replay_as_one(tmp_path: Path) -> None:
    run = await record_federation(tmp_path, rotate_bytes=4096)
    files = sorted(run.records.iterdir())
    assert len(files) >= 4
    log = load_log(list(reversed(files)))  # given in any order, read in recorded order
    assert [f.header.file_index for f in log.files if f.header] == list(range(len(files)))
    assert log.notes == () and log.damage == ()
    replay = replay_consensus(interpret(log), log.settings or run.settings, embedder=HashingEmbedder())
    assert {(s.round_id, s.shard_id): s.replayed for s in replay.shards} == run.labels

    shutil.move(str(files[1]), str(tmp_path / "aside"))  # a file lost from the middle
    assert "files 1..1 are missing" in load_log([run.records]).notes[0]


def test_publish_checks_identity_options_up_front(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"alice": "pw"}))
    passwords = load_credentials(credentials)
    with pytest.raises(ReplayError, match="no password for bob"):
        amqp_connector("amqp://localhost:5672/chorus", passwords, ["alice", "bob"])
    with pytest.raises(ReplayError, match="without a user"):
        amqp_connector("amqp://admin:pw@localhost:5672/chorus", passwords, ["alice"])
    with pytest.raises(ReplayError, match="in-process"):
        amqp_connector("memory://", passwords, ["alice"])
    credentials.write_text("[1, 2]")
    with pytest.raises(ReplayError, match="expected a JSON object"):
        load_credentials(credentials)


def test_missing_log_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.chorus-log")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.amqp
async def test_republished_log_drives_a_coordinator_on_rabbitmq(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """`chorus-replay publish` end to end: each participant's messages through its own login."""
    original = await record_federation(tmp_path / "original", delay=0.3)
    plan = plan_republish(interpret(load_log([original.records])))
    urls = rabbit_vhost(participants=tuple(plan.users))
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps({user: unquote(urlsplit(url).password or "") for user, url in urls.items()})
    )
    parts = urlsplit(urls[COORDINATOR_USER])
    broker_url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # no user in it

    settings = msgspec.structs.replace(
        original.settings,
        state_path=str(tmp_path / "fresh.sqlite3"),
        recording=msgspec.structs.replace(original.settings.recording, enabled=False),
    )
    async with AmqpTransport(urls[COORDINATOR_USER], connection_name="test replay coordinator") as transport:
        coordinator = build_coordinator(settings, transport, embedder=HashingEmbedder())
        await coordinator.start()
        drive = asyncio.create_task(coordinator.drive())
        arguments = [
            "publish",
            str(original.records),
            "--broker",
            broker_url,
            "--credentials",
            str(credentials),
        ]
        status = await asyncio.to_thread(main, [*arguments, "--speed", "2", "--follow-rounds"])
        await asyncio.wait_for(drive, 30.0)
        await coordinator.stop_intake()
    assert status == 0
    out = capsys.readouterr().out
    assert f"published {len(plan.messages)} of {len(plan.messages)} messages" in out and "1 malformed" in out
    assert published_labels(coordinator) == original.labels
    assert coordinator.counters.dead_lettered == 1  # mallory's forgery: the broker stamped user_id=mallory
    coordinator.store.close()
