"""The contract kit a client in another language tests itself against: the JSON Schema and the golden
files under schemas/golden/ are what `schemas.contract` generates, and they say what our decoders and
the coordinator do with each file."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from support.coordinators import memory_coordinator, write_config
from support.waiting import eventually

from broker.memory import MemoryBroker
from broker.topology import DEAD_LETTER_QUEUE, UP_EXCHANGE, control_key, full_topology, generation_key
from broker.transport import REASON_HEADER, Delivery
from schemas import contract
from schemas.codec import encode
from schemas.errors import SchemaError, SchemaProblem
from schemas.examples import EXAMPLES, kind_of

GOLDEN = contract.GOLDEN_DIR
OUT_OF_DATE = (
    f"schemas/golden/ is out of date: run `{contract.REGENERATE}` (or make contract) and check the "
    "diff against the evolution rules of PROTOCOL.md §8.4"
)
MANIFEST: dict[str, Any] = json.loads((GOLDEN / contract.MANIFEST_FILE).read_text())
ENTRIES: list[dict[str, Any]] = MANIFEST["files"]
INVALID = [e for e in ENTRIES if not e["valid"]]


def test_the_schema_is_generated_from_the_types() -> None:
    committed = json.loads((GOLDEN / contract.SCHEMA_FILE).read_text())
    assert committed == contract.json_schema(), OUT_OF_DATE


def test_the_golden_files_are_what_the_generator_writes() -> None:
    assert contract.differences() == [], OUT_OF_DATE


def test_the_drift_check_sees_a_changed_missing_or_stale_file(tmp_path: Path) -> None:
    assert contract.write(tmp_path) and contract.differences(tmp_path) == []
    (tmp_path / "valid" / "join.msgpack").write_bytes(b"\xc0")
    (tmp_path / "invalid" / "array.msgpack").unlink()
    (tmp_path / "valid" / "left_over.msgpack").write_bytes(b"")
    assert contract.differences(tmp_path) == [
        "missing invalid/array.msgpack",
        "differs valid/join.msgpack",
        "stale valid/left_over.msgpack",
    ]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: str(e["file"]))
def test_each_golden_file_decodes_as_the_manifest_says(entry: dict[str, Any]) -> None:
    body = (GOLDEN / entry["file"]).read_bytes()
    decode = contract.DECODERS[entry["queue"]]
    if entry["valid"]:
        message = decode(body)
        assert kind_of(message) == entry["kind"]
        assert contract.plain(message) == json.loads((GOLDEN / entry["expected"]).read_text())
        assert (encode(message) == body) is entry["reference_encoding"]
        return
    with pytest.raises(SchemaError) as caught:
        decode(body)
    assert caught.value.problem == entry["problem"]
    assert str(caught.value) == entry["error"]


def test_the_reference_files_are_the_pinned_examples() -> None:
    for message in EXAMPLES:  # tests/test_schemas.py pins the sha256 of each of these encodings
        assert (GOLDEN / "valid" / f"{kind_of(message)}.msgpack").read_bytes() == encode(message)


def test_the_files_cover_every_kind_queue_and_problem() -> None:
    kinds = {kind_of(k) for kinds in contract.QUEUE_KINDS.values() for k in kinds}
    assert {e["kind"] for e in ENTRIES if e["valid"] and e["reference_encoding"]} == kinds
    assert {e["queue"] for e in INVALID} == set(contract.QUEUE_KINDS)
    assert {e["problem"] for e in INVALID} == set(get_args(SchemaProblem))
    assert len({e["file"] for e in ENTRIES}) == len(ENTRIES)
    on_disk = {p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*.msgpack")}
    assert on_disk == {e["file"] for e in ENTRIES}


def test_protocol_md_dumps_the_golden_example_byte_for_byte() -> None:
    body = (GOLDEN / "valid" / "generation_batch.protocol_example.msgpack").read_bytes()
    protocol = (Path(__file__).resolve().parent.parent / "PROTOCOL.md").read_text()
    assert f"({len(body)} bytes,\nsha256 `{hashlib.sha256(body).hexdigest()}`)" in protocol


def test_the_schema_describes_each_valid_file() -> None:
    """Not a validator: every kind is a definition whose keys and required keys fit the valid files."""
    schema = json.loads((GOLDEN / contract.SCHEMA_FILE).read_text())
    mapping: dict[str, str] = schema["discriminator"]["mapping"]
    assert set(mapping) == {kind_of(m) for m in EXAMPLES}
    by_kind = {kind: schema["$defs"][ref.removeprefix("#/$defs/")] for kind, ref in mapping.items()}
    assert all(d["properties"]["kind"] == {"enum": [kind]} for kind, d in by_kind.items())
    for entry in (e for e in ENTRIES if e["valid"]):
        definition = by_kind[entry["kind"]]
        raw = msgspec.msgpack.decode((GOLDEN / entry["file"]).read_bytes())
        assert set(definition["required"]) <= raw.keys(), entry["file"]
        expected = json.loads((GOLDEN / entry["expected"]).read_text())
        assert expected.keys() <= definition["properties"].keys(), entry["file"]


def test_the_reason_header_is_the_transports() -> None:
    assert MANIFEST["reason_header"] == contract.REASON_HEADER == REASON_HEADER


async def test_the_coordinator_dead_letters_each_invalid_file_with_its_reason(tmp_path: Path) -> None:
    broker = MemoryBroker()
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1), broker)
    broker.declare(full_topology(["alice"]))
    dead: dict[str, str] = {}

    async def collect(delivery: Delivery) -> None:
        dead[str(delivery.message_id)] = str(delivery.headers[REASON_HEADER])

    await broker.connect("inspector").consume(DEAD_LETTER_QUEUE, collect)
    await coordinator.start()
    sender = broker.connect("alice")
    sent = [e for e in INVALID if e["queue"] != "reply"]  # a participant reads the reply queue
    for entry in sent:
        key = generation_key(0, "alice") if entry["queue"] == "generation" else control_key("alice")
        body = (GOLDEN / entry["file"]).read_bytes()
        await sender.publish(UP_EXCHANGE, key, body, message_id=entry["file"].replace("/", "-"))
    try:
        await eventually(lambda: len(dead) == len(sent))
    finally:
        await coordinator.stop_intake()
        await asyncio.sleep(0)
    for entry in sent:
        reason = dead[entry["file"].replace("/", "-")]
        if "note" in entry:  # this coordinator's strategy is not FedAvg: it refuses a big control body first
            assert reason.startswith(entry["note"].split("`")[1].removesuffix(" (…)")), reason
        else:
            assert reason == entry["reason"]
