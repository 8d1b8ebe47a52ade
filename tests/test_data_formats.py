"""Data files in every accepted format, and the errors for bad records: each names the file, the line
(a parquet file's row) and the formats accepted."""

from __future__ import annotations

import builtins
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from participant.data import DataError, Example, chat_prompt, load_examples, read_data_file

ACCEPTED = "accepted formats: prompt_response"


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---- good files -------------------------------------------------------------------------------------


def test_prompt_response_jsonl_is_unchanged(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "response": "b", "id": 7}, {"prompt": "c", "response": "d"}]
    )
    data = read_data_file(path)
    assert data.examples == [Example("a", "b"), Example("c", "d")]
    assert data.layout == "jsonl" and data.formats == {"prompt_response": 2}


def test_alpaca_as_a_json_array_the_original_release_layout(tmp_path: Path) -> None:
    path = tmp_path / "alpaca_data.json"
    records = [
        {"instruction": "Give a tip.", "input": "", "output": "Sleep."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "hi"},  # no input at all
    ]
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")  # pretty-printed, many lines
    data = read_data_file(path)
    assert data.layout == "json array" and data.formats == {"alpaca": 3}
    assert data.examples == [
        Example("Give a tip.", "Sleep."),
        Example("Add the numbers.\n\n2 and 3", "5"),
        Example("Say hi.", "hi"),
    ]
    assert data.sources[1].where == f"{path}:7 (array item 2)"


def test_alpaca_jsonl_and_an_empty_array(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "input": "x", "output": "o", "weight": 0.5}])
    assert load_examples(path) == [Example("i\n\nx", "o", 0.5)]
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ]\n")
    assert load_examples(empty) == []


def test_chat_single_turn_system_and_multi_turn(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "chat.jsonl",
        [
            chat(("user", "Capital of Italy?"), ("assistant", "Rome.")),
            chat(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")),
            chat(("user", "3*3?"), ("assistant", "9"), ("user", "And 3*4?"), ("assistant", "12")),
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": "Hello"}]},
        ],
    )  # fmt: skip
    data = read_data_file(path)
    assert data.formats == {"chat": 4}
    assert data.examples == [
        Example("Capital of Italy?", "Rome."),
        Example("Be brief.\n\n2+2?", "4"),
        Example("User: 3*3?\n\nAssistant: 9\n\nUser: And 3*4?", "12"),
        Example("Hi", "Hello"),
    ]
    assert [(s.system, s.turns) for s in data.sources] == [(False, 1), (True, 1), (False, 2), (False, 1)]


def test_the_chat_prompt_puts_system_messages_first() -> None:
    turns = [("user", "a"), ("system", "s"), ("assistant", "b"), ("user", "c")]
    assert chat_prompt(turns) == "s\n\nUser: a\n\nAssistant: b\n\nUser: c"


def test_hugging_face_to_json_records_with_extra_columns(tmp_path: Path) -> None:
    """`Dataset.to_json` writes every column, compactly, one record a line (what it writes, by hand here)."""
    path = tmp_path / "hf.jsonl"
    path.write_text(
        '{"messages":[{"content":"Hi","role":"user"},{"content":"Hello","role":"assistant"}],"source":"x"}\n'
        '{"messages":[{"content":"Bye","role":"user"},{"content":"Ciao","role":"assistant"}],"source":"y"}\n'
    )
    assert load_examples(path) == [Example("Hi", "Hello"), Example("Bye", "Ciao")]


def test_an_explicit_format_is_held_to(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert load_examples(path, "prompt_response") == [Example("a", "b")]
    with pytest.raises(
        DataError, match=rf"d\.jsonl:1: 'instruction' and 'output' .*\(alpaca record\); {ACCEPTED}"
    ):
        load_examples(path, "alpaca")
    with pytest.raises(DataError, match="unknown data format"):
        load_examples(path, "csv")  # type: ignore[arg-type]


def test_a_bom_and_blank_lines_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n\n  \n')
    assert load_examples(path) == [Example("a", "b")]


# ---- bad records ------------------------------------------------------------------------------------

ASSISTANT = '{"role": "assistant", "content": "b"}'
BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', r"message 3 \(user\) follows the last assistant turn"),
    ('{"messages": [{"role": "tool", "content": "x"}, ' + ASSISTANT + "]}", "role 'tool'"),
    ('{"messages": [{"role": "system", "content": "x"}, ' + ASSISTANT + "]}", "no user turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}', "'content'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, '
     '{"role": "assistant", "content": "b"}]}', "only text content parts"),
    ('{"instruction": "i"}', "'instruction' and 'output'"),
    ('{"instruction": "i", "input": 3, "output": "o"}', "'input' must be a string"),
    ('{"prompt": "a"}', "'prompt' and 'response'"),
    ('{"prompt": "a", "response": "b", "weight": "x"}', "'weight' must be a number"),
    ('{"question": "a", "answer": "b"}', r"no accepted format \(its keys: answer, question\)"),
    ('"just a string"', "expected a JSON object"),
    ("{not json", "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_a_bad_jsonl_line_names_file_line_problem_and_the_formats(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "ok"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{problem}.*{ACCEPTED}.*parquet") as caught:
        load_examples(path)
    assert str(path) in str(caught.value)


def test_the_two_messages_teams_met_before(tmp_path: Path) -> None:
    """An Alpaca .json array said "not valid JSON (Expecting value)", a chat line "'prompt' and
    'response' must both be present": both now load."""
    array = tmp_path / "alpaca.json"
    array.write_text('[\n {"instruction": "i", "input": "", "output": "o"}\n]\n')
    lines = jsonl(tmp_path / "chat.jsonl", [chat(("user", "u"), ("assistant", "a"))])
    assert load_examples(array) == [Example("i", "o")]
    assert load_examples(lines) == [Example("u", "a")]


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        (
            '[\n {"instruction": "i", "output": "o"},\n {"instruction": "i"}\n]',
            ":3 (array item 2)",
            "'output'",
        ),
        ('[\n {"instruction": "i", "output": "o"}\n {"instruction": "i"}\n]', ":3", "expected ',' or ']'"),
        ('[\n {"instruction": "i", "output": "o"},\n {"instruction": }\n]', ":3", "not valid JSON"),
        ('[\n {"instruction": "i", "output": "o"}\n]\n{}', ":3", "text after the end"),
    ],
)
def test_a_bad_json_array_names_the_line(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"bad\.json{re.escape(where)}: .*{problem}"):
        load_examples(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read .*missing"):
        load_examples(tmp_path / "missing.jsonl")
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(binary)


# ---- parquet ----------------------------------------------------------------------------------------


def test_parquet_without_pyarrow_says_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    for module in [m for m in sys.modules if m.startswith("pyarrow")]:
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(DataError, match=r"train\.parquet is a parquet file.*pip install pyarrow"):
        load_examples(path)


def test_parquet_as_datasets_writes_it(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    rows = [
        {"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello", "role": "assistant"}]},
        {"messages": [{"content": "Bye", "role": "user"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    assert read_data_file(path).layout == "parquet"
    assert load_examples(path) == [Example("Hi", "Hello")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"train\.parquet: row 2: no assistant turn"):
        load_examples(path)
    alpaca = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "i", "input": None, "output": "o"}]), alpaca)
    assert load_examples(alpaca) == [Example("i", "o")]
