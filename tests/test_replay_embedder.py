"""`chorus-replay consensus` loads no local embedder folder because a record file names it: the folder comes
from the command line (`--embedder DIR`) or the replay refuses."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type stubs
import msgspec
import pytest
import structlog
from support.recorded import RecordedRun, record_federation

import coordinator.wiring
from broker.record_format import FramePacker, read_log_file
from common.embedding import Embedder, HashingEmbedder
from coordinator.replay.cli import main
from coordinator.replay.consensus import NAMED_EMBEDDERS, ConsensusOverrides, replay_settings
from coordinator.replay.log import ReplayError


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`main()` points structlog at the captured stderr; put the configuration back afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    return asyncio.run(record_federation(tmp_path_factory.mktemp("federation")))


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders the replay asks to load a sentence embedder from (each gets the hashing embedder)."""
    folders: list[Path] = []

    def sentence_embedder(folder: Path | None = None, **options: Any) -> Embedder:
        assert folder is not None, "the replay asked for MiniLM, not a folder"
        folders.append(folder)
        return HashingEmbedder()

    monkeypatch.setattr(coordinator.wiring, "SentenceEmbedder", sentence_embedder)
    return folders


def planted_copy(records: Path, into: Path, embedder: str) -> Path:
    """The recorded log with its header's settings naming `embedder`, as a hostile record file would."""
    into.mkdir()
    for path in sorted(records.iterdir()):
        data = path.read_bytes()
        unpacker = msgpack.Unpacker(io.BytesIO(data), raw=False)
        unpacker.unpack()  # the header frame
        header = read_log_file(path).header
        assert header is not None
        fields = msgspec.to_builtins(header) | {"type": "header"}
        fields["settings"]["consensus"]["embedder"] = embedder
        (into / path.name).write_bytes(FramePacker().pack(fields) + data[unpacker.tell() :])
    return into


def test_recorded_settings_naming_a_folder_need_an_explicit_embedder(recorded: RecordedRun) -> None:
    table = msgspec.structs.replace(recorded.settings.consensus, embedder="/srv/models/planted")
    settings = msgspec.structs.replace(recorded.settings, consensus=table)
    with pytest.raises(ReplayError, match=r"embedder folder '/srv/models/planted'.*pass --embedder DIR"):
        replay_settings(settings, ConsensusOverrides())
    chosen = replay_settings(settings, ConsensusOverrides(embedder="/srv/models/planted"))  # said on purpose
    assert chosen.consensus.embedder == "/srv/models/planted"
    assert replay_settings(settings, ConsensusOverrides(embedder="hashing")).consensus.embedder == "hashing"
    for name in NAMED_EMBEDDERS:  # a name loads nothing from a folder the record picks
        named = msgspec.structs.replace(settings, consensus=msgspec.structs.replace(table, embedder=name))
        assert replay_settings(named, ConsensusOverrides()).consensus.embedder == name


def test_a_record_file_naming_a_folder_loads_nothing_unless_asked(
    recorded: RecordedRun, tmp_path: Path, loaded: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    planted = tmp_path / "planted-model"
    planted.mkdir()
    records = planted_copy(recorded.records, tmp_path / "records", str(planted))
    assert main(["consensus", str(records)]) == 2
    error = capsys.readouterr().err
    assert f"the log's settings name the local embedder folder {str(planted)!r}" in error
    assert "a record file does not choose what this machine loads" in error
    assert loaded == []  # refused before anything was loaded
    assert main(["consensus", str(records), "--embedder", "hashing", "--check"]) == 0
    assert loaded == []
    assert main(["consensus", str(records), "--embedder", str(planted), "--check"]) == 0
    assert loaded == [planted]  # the folder the command line named, and only then
