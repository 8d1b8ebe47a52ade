"""Directory replacement: a crash mid-write keeps the old directory and leaves no staging behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.atomic import write_directory_atomically


def test_failed_directory_write_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    write_directory_atomically(target, lambda staging: (staging / "a.txt").write_text("old"))

    def crash(staging: Path) -> None:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("crashed mid-write")

    with pytest.raises(RuntimeError):
        write_directory_atomically(target, crash)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no staging left behind
    write_directory_atomically(target, lambda staging: (staging / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
