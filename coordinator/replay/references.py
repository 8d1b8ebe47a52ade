"""Reference answers to the public prompts, from the JSONL file the stdlib task writes
(`public_references.jsonl`: one `{"prompt_id", "family", "response"}` object a line).

Evaluator-only data: the coordinator never needs it to run, only to say how good its labels were.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from coordinator.replay.log import ReplayError


class _ReferenceLine(msgspec.Struct, frozen=True):
    prompt_id: str
    response: str | None = None  # what federation/stdlib_task/files.py writes
    reference: str | None = None  # accepted as well, for hand-written files


_decoder = msgspec.json.Decoder(_ReferenceLine)


def load_references(path: Path) -> dict[str, str]:
    """Prompt id -> reference text; a ReplayError names the file and line of anything wrong."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReplayError(f"references file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReplayError(f"cannot read references file {path}: {e}") from e
    references: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = _decoder.decode(line)
        except msgspec.DecodeError as e:  # bad JSON and wrong shapes alike
            raise ReplayError(f"{where}: not a reference line ({e})") from e
        text = item.response if item.response is not None else item.reference
        if text is None:
            raise ReplayError(f'{where}: no "response" (or "reference") field')
        if item.prompt_id in references and references[item.prompt_id] != text:
            raise ReplayError(
                f"{where}: prompt {item.prompt_id!r} already has another reference "
                f"(line {first_seen[item.prompt_id]})"
            )
        references[item.prompt_id] = text
        first_seen.setdefault(item.prompt_id, number)
    if not references:
        raise ReplayError(f"references file {path} holds no references")
    return references
