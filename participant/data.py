"""Training examples: a prompt, the response to learn, and how much that example counts.

A data file holds records in one of three formats, found from each record's keys unless
`data_format` names one:

- `prompt_response`: `{"prompt": ..., "response": ...}`
- `alpaca`: `{"instruction": ..., "input": ... (optional), "output": ...}`; the prompt is the
  instruction, then a blank line and the input when there is one
- `chat`: `{"messages": [{"role": ..., "content": ...}, ...]}` as OpenAI and Hugging Face write it; the
  last assistant turn is the response and the turns before it the prompt (`chat_prompt` says how a
  system message and earlier turns become one prompt)

Every record may carry a `weight` (default 1); other keys are ignored (Hugging Face `datasets`
writes every column). The file is JSONL (one record per line), one JSON array of records (the
original Alpaca release, `to_json(lines=False)`), or parquet (`datasets`' `to_parquet`; needs
pyarrow). A bad record is an error that names the file, its line (a parquet file's row) and the
accepted formats.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from schemas.errors import ChorusError

RecordFormat = Literal["prompt_response", "alpaca", "chat"]
DataFormat = Literal["auto", "prompt_response", "alpaca", "chat"]
RECORD_FORMATS: tuple[RecordFormat, ...] = get_args(RecordFormat)
SYSTEM_ROLES = ("system", "developer")  # "developer" is OpenAI's newer name for the system turn
CHAT_ROLES = (*SYSTEM_ROLES, "user", "assistant")
PARQUET_MAGIC = b"PAR1"

ACCEPTED_FORMATS = (
    'accepted formats: prompt_response {"prompt", "response"}; '
    'alpaca {"instruction", "input" (optional), "output"}; '
    'chat {"messages": [{"role", "content"}, ...] ending with an assistant turn}; '
    "one record per line (JSONL), one JSON array of records, or parquet"
)


class DataError(ChorusError):
    """A data file or example is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One supervised pair. `weight` scales this example's loss (pseudo-labels may carry their confidence).
    `public`: it came from the federation (a pseudo-label), not from private data; differential privacy
    ([train.privacy]) spends no budget on it. Anything not marked public is treated as private."""

    prompt: str
    response: str
    weight: float = 1.0
    public: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:
            raise DataError(f"example weight must be a finite number >= 0, got {self.weight!r}")


@dataclass(frozen=True)
class Source:
    """Where an example came from, and what its record held beyond the prompt and response."""

    where: str  # "file:line", "file:line (array item N)" or "file: row N"
    format: RecordFormat
    system: bool = False  # a chat record with a system message (it is part of the prompt)
    turns: int = 1  # user turns in the prompt of a chat record (more than one: flattened)


@dataclass
class DataFile:
    """A data file as read: its examples, each one's `Source`, and the file's layout."""

    path: Path
    layout: Literal["jsonl", "json array", "parquet"]
    examples: list[Example] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    @property
    def formats(self) -> Counter[RecordFormat]:
        return Counter(source.format for source in self.sources)


def load_examples(path: Path, data_format: DataFormat = "auto") -> list[Example]:
    """The examples of a data file in any accepted format (see the module docstring)."""
    return read_data_file(path, data_format).examples


def load_jsonl(path: Path, data_format: DataFormat = "auto") -> list[Example]:
    """The examples of a data file; kept under its old name (it reads every accepted format now)."""
    return load_examples(path, data_format)


def read_data_file(path: Path, data_format: DataFormat = "auto") -> DataFile:
    """Read every record of `path`: JSONL, a JSON array or parquet, found from the content."""
    if data_format != "auto" and data_format not in RECORD_FORMATS:
        raise DataError(
            f"unknown data format {data_format!r}: use auto or one of {', '.join(RECORD_FORMATS)}"
        )
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if content.startswith(PARQUET_MAGIC):
        data = DataFile(path, "parquet")
        records: Iterator[tuple[str, object]] = _parquet_records(path)
    else:
        try:
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"cannot read {path}: not UTF-8 text ({e}); {ACCEPTED_FORMATS}") from e
        if text.lstrip().startswith("["):
            data = DataFile(path, "json array")
            records = _array_records(path, text)
        else:
            data = DataFile(path, "jsonl")
            records = _jsonl_records(path, text)
    for where, record in records:
        example, source = parse_record(record, where, data_format)
        data.examples.append(example)
        data.sources.append(source)
    return data


# ---- the layouts: where each record is, and the record ---------------------------------------------


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, object]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg}); a JSONL file holds one whole record per line; "
                f"{ACCEPTED_FORMATS}"
            ) from e


def _array_records(path: Path, text: str) -> Iterator[tuple[str, object]]:
    """The items of one JSON array, each named by the line it starts on."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line, counted = 1, 0
    item = 0

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    def skip_space(offset: int) -> int:
        while offset < len(text) and text[offset] in " \t\r\n":
            offset += 1
        return offset

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        item += 1
        where = f"{path}:{line_at(position)} (array item {item})"
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {ACCEPTED_FORMATS}") from e
        yield where, record
        position = skip_space(position)
        if position < len(text) and text[position] == ",":
            position = skip_space(position + 1)
            continue
        if position < len(text) and text[position] == "]":
            if text[position + 1 :].strip():
                raise DataError(f"{path}:{line_at(position)}: text after the end of the JSON array")
            return
        raise DataError(
            f"{path}:{line_at(position)}: expected ',' or ']' in the JSON array; {ACCEPTED_FORMATS}"
        )


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(
            f"{path} is a parquet file, and reading parquet needs pyarrow: `pip install pyarrow`, "
            "or save the data as JSONL (datasets: `to_json`)"
        ) from e
    try:
        rows: list[object] = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types (ArrowInvalid, OSError, ...)
        raise DataError(f"cannot read {path} as parquet: {e}") from e
    for row_number, row in enumerate(rows, start=1):
        yield f"{path}: row {row_number}", row


# ---- the record formats ------------------------------------------------------------------------------


def detect_format(record: object) -> RecordFormat | None:
    """The format a record's keys say, or None when they match none."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "response" in record:
        return "prompt_response"
    return None


def parse_record(record: object, where: str, data_format: DataFormat = "auto") -> tuple[Example, Source]:
    """One record as an example; `where` names it in errors."""
    found = detect_format(record) if data_format == "auto" else data_format
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {ACCEPTED_FORMATS}")
    if found is None:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: a record of no accepted format (its keys: {keys}); {ACCEPTED_FORMATS}")
    try:
        if found == "chat":
            prompt, response, system, turns = _chat(record)
        else:
            prompt, response = _alpaca(record) if found == "alpaca" else _prompt_response(record)
            system, turns = False, 1
        weight = record.get("weight", 1.0)
        if weight is None:
            weight = 1.0
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise DataError("'weight' must be a number")
        example = Example(prompt=prompt, response=response, weight=float(weight))
    except DataError as e:
        raise DataError(f"{where}: {e} ({found} record); {ACCEPTED_FORMATS}") from e
    return example, Source(where, found, system, turns)


def _prompt_response(record: dict[str, Any]) -> tuple[str, str]:
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError("'prompt' and 'response' must both be present and be strings")
    return prompt, response


def _alpaca(record: dict[str, Any]) -> tuple[str, str]:
    instruction, given, output = record.get("instruction"), record.get("input"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise DataError("'instruction' and 'output' must both be present and be strings")
    if given is not None and not isinstance(given, str):
        raise DataError("'input' must be a string when present")
    return (f"{instruction}\n\n{given}" if given and given.strip() else instruction), output


def _chat(record: dict[str, Any]) -> tuple[str, str, bool, int]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError('\'messages\' must be a non-empty list of {"role", "content"} objects')
    turns: list[tuple[str, str]] = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"message {number} is not an object with 'role' and 'content'")
        role, content = message.get("role"), _content(message.get("content"), number)
        if role not in CHAT_ROLES:
            raise DataError(f"message {number} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        turns.append((str(role), content))
    answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    if not answers:
        raise DataError("no assistant turn: the last assistant turn is the response to learn")
    last = answers[-1]
    if last != len(turns) - 1:
        raise DataError(
            f"message {last + 2} ({turns[last + 1][0]}) follows the last assistant turn; "
            "a conversation must end with the answer to learn"
        )
    context = turns[:last]
    if not any(role == "user" for role, _ in context):
        raise DataError("no user turn before the last assistant turn")
    system = any(role in SYSTEM_ROLES for role, _ in context)
    return chat_prompt(context), turns[last][1], system, sum(role == "user" for role, _ in context)


def _content(content: object, number: int) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise DataError(f"message {number}: only text content parts are accepted")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"message {number}: 'content' must be a string or a list of text parts")


def chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The prompt of a conversation's turns before the answer, as one text.

    Federation prompts are one user turn (the model's chat template wraps them as one), so: system
    messages come first, joined by blank lines; then a single user turn is its own text, while a
    multi-turn conversation is written out as `User: ...` / `Assistant: ...` paragraphs.
    """
    system = [content for role, content in turns if role in SYSTEM_ROLES]
    dialogue = [(role, content) for role, content in turns if role not in SYSTEM_ROLES]
    if len(dialogue) == 1:
        body = dialogue[0][1]
    else:
        body = "\n\n".join(f"{role.capitalize()}: {content}" for role, content in dialogue)
    return "\n\n".join([*system, body])


# ---- splitting -------------------------------------------------------------------------------------


def train_test_split(
    examples: Sequence[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Shuffle with `seed` and hold out `test_fraction` (at least one example when there are two or more)."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test = round(len(shuffled) * test_fraction)
    if test_fraction > 0 and n_test == 0 and len(shuffled) >= 2:
        n_test = 1
    return shuffled[n_test:], shuffled[:n_test]
