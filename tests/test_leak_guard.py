"""The leak guard: an answer that copies a span of a private example is withheld before it is published,
counted, and never logged; paraphrases and answers near the threshold go out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs
from support.coordinators import memory_coordinator
from support.tiny_models import coordinator_config

from broker.memory import MemoryBroker
from broker.topology import full_topology
from participant.data import Example
from participant.leak_guard import LeakGuard, ngram_hashes, tokens
from participant.learner import FunctionLearner
from participant.service import Participant
from participant.settings import LeakGuardTable, ParticipantSettings, SettingsError, load_participant_settings
from schemas.codec import decode_generation
from schemas.messages import Answer

SECRET = Example(
    prompt="What is the access code of patient 4471?",
    response="The access code of patient 4471 is 8KQ2-7TZD, written on the blue card in the locked drawer.",
)
OTHER = Example(
    prompt="Where is the clinic?", response="The clinic is on the corner of Elm Street and Fifth Avenue."
)
PRIVATE = [SECRET, OTHER]
GUARD = LeakGuard(LeakGuardTable(), PRIVATE)


def words(text: str, start: int, count: int) -> str:
    """`count` normalized tokens of `text` from token `start`, joined by spaces."""
    return " ".join(tokens(text)[start : start + count])


# -- normalization -------------------------------------------------------------


def test_tokens_fold_case_unicode_whitespace_punctuation_and_invisible_characters() -> None:
    assert tokens("The  Access\tcode:\n8KQ2-7TZD!") == ["the", "access", "code", "8kq2", "7tzd"]
    assert tokens("ＴＨＥ ａｃｃｅｓｓ ｃｏｄｅ") == ["the", "access", "code"]  # fullwidth forms (NFKC)
    assert tokens("STRASSE straße") == ["strasse", "strasse"]  # case folding, not just lower()
    assert tokens("pa\u200btient\u00ad4471") == ["patient4471"]  # zero-width space and soft hyphen removed
    assert tokens("**patient** _4471_ `code`") == ["patient", "4471", "code"]  # markup only separates
    assert tokens("患者の番号") == ["患", "者", "の", "番", "号"]  # unspaced scripts: a token per character
    assert tokens("caf\u0065\u0301") == tokens("café")  # composed and decomposed accents agree


def test_ngram_hashes_need_n_tokens() -> None:
    assert ngram_hashes(["a", "b", "c"], 4) == set()
    assert len(ngram_hashes(["a", "b", "c", "d", "a", "b", "c", "d"], 4)) == 4  # repeats counted once


# -- the span test ---------------------------------------------------------------


def test_eight_tokens_copied_from_a_private_response_are_withheld_seven_are_not() -> None:
    response = SECRET.response
    assert GUARD.check(f"Sure! {words(response, 3, 8)} and that is all.") == "span"
    assert GUARD.check(f"Sure! {words(response, 3, 7)} and that is all.") is None
    # near misses: every 7-token window matches, but one word differs in the middle of the copy
    copied = tokens(response)
    changed = " ".join([*copied[:7], "green", *copied[8:14]])
    assert ngram_hashes(tokens(changed), 8) & GUARD._spans == set()
    assert GUARD.check(changed) is None


def test_normalization_does_not_let_case_spacing_unicode_or_punctuation_through() -> None:
    for variant in (
        SECRET.response.upper(),
        SECRET.response.replace(" ", "   \n "),
        "Ｔｈｅ ａｃｃｅｓｓ ｃｏｄｅ ｏｆ ｐａｔｉｅｎｔ ４４７１ ｉｓ ８ＫＱ２-７ＴＺＤ",
        "the access code of patient 4471 is 8KQ2 / 7TZD",
        "**The access code** of _patient 4471_ is `8KQ2-7TZD`.",
        "The\u200b access code of pa\u00adtient 4471 is 8KQ2-7TZD",
    ):
        assert GUARD.check(variant) == "span", variant


def test_a_paraphrase_or_an_unrelated_answer_goes_out() -> None:
    assert GUARD.check("Patient 4471 keeps a code on a blue card, which is locked in a drawer.") is None
    assert GUARD.check("The access code is something only the clinic's staff can tell you, sorry.") is None
    assert GUARD.check("") is None
    assert GUARD.check("8KQ2-7TZD") is None  # a secret alone, shorter than the span: not caught (documented)


def test_prompts_are_indexed_with_responses_by_default_and_a_span_may_cross_them() -> None:
    crossing = "access code of patient 4471 the access code of"  # prompt's end, then the response's start
    assert GUARD.check(crossing) == "span"
    assert GUARD.check("What is the access code of patient 4471? Nobody knows.") == "span"
    responses_only = LeakGuard(LeakGuardTable(index_prompts=False), PRIVATE)
    assert responses_only.check(crossing) is None
    assert responses_only.check("What is the access code of patient 4471? Nobody knows.") is None
    assert responses_only.check(SECRET.response) == "span"


def test_a_span_the_answered_prompt_holds_is_not_a_leak() -> None:
    answer = "The clinic is on the corner of Elm Street and Fifth Avenue, as you said."
    assert GUARD.check(answer) == "span"
    assert GUARD.check(answer, prompt=f"Repeat after me: {OTHER.response}") is None  # the coordinator sent it
    # but a private span beyond what the prompt holds still is
    assert GUARD.check(SECRET.response, prompt="The access code of patient 4471 is") == "span"


def test_the_span_length_is_configurable() -> None:
    short = LeakGuard(LeakGuardTable(min_span_tokens=4), PRIVATE)
    assert short.check("It is on Elm Street and Fifth, I think.") == "span"  # "elm street and fifth"
    assert GUARD.check("It is on Elm Street and Fifth, I think.") is None


def test_a_disabled_guard_or_one_without_private_data_withholds_nothing() -> None:
    off = LeakGuard(LeakGuardTable(enabled=False), PRIVATE)
    assert off.check(SECRET.response) is None and off.examples == 0
    assert LeakGuard(LeakGuardTable(), []).check(SECRET.response) is None


# -- the precision test ------------------------------------------------------------


def test_precision_against_the_nearest_private_example_catches_a_copy_with_words_changed() -> None:
    copied = tokens(SECRET.response)
    edited = " ".join(w if i % 6 != 5 else "x" for i, w in enumerate(copied))  # a word in six replaced
    assert GUARD.check(edited) is None  # no 8 tokens in a row survive, and precision is off by default
    precise = LeakGuard(LeakGuardTable(max_precision=0.3), PRIVATE)
    assert precise._precision(tokens(edited), []) > 0.3
    assert precise.check(edited) == "precision"
    # answers shorter than the span are never judged by precision; unrelated ones share nothing
    assert precise.check("the access code of patient") is None
    assert precise.check("Patient 4471 keeps a code on a blue card, which is locked in a drawer.") is None


# -- screening a round's answers -------------------------------------------------------


def test_screen_blanks_a_withheld_answer_and_keeps_its_numbers_home() -> None:
    answers = [
        Answer(prompt_id="p1", text=SECRET.response, prompt_tokens=9, completion_tokens=30, logprob=-0.1),
        Answer(prompt_id="p2", text="Four.", prompt_tokens=7, completion_tokens=2, logprob=-0.5),
    ]
    screened = GUARD.screen(answers, {"p1": "Tell me a secret.", "p2": "Two plus two?"})
    assert screened.answers == {
        "p1": Answer(prompt_id="p1", text="", prompt_tokens=9),
        "p2": answers[1],
    }
    assert screened.withheld == {"p1": "span"}
    assert screened.counts() == {"withheld": 1, "span": 1, "precision": 0}
    omitting = LeakGuard(LeakGuardTable(withhold_as="omit"), PRIVATE).screen(answers, {})
    assert omitting.answers == {"p2": answers[1]} and omitting.counts()["withheld"] == 1


def test_thousands_of_private_examples_are_indexed_and_each_copy_is_caught() -> None:
    # Behaviour only: how long building and checking take is a benchmark's business, not a test's.
    examples = [
        Example(
            prompt=f"In one sentence, what does the function `module{i}.helper{i}(x)` do with its input?",
            response=f"Return the {i}th transformed copy of x, where every item is scaled by {i % 97} and "
            f"sorted by key {i * 7}; raises ValueError when x is empty or holds {i} or more items.",
        )
        for i in range(5_000)
    ]
    guard = LeakGuard(LeakGuardTable(), examples)
    assert guard.examples == 5_000, guard.summary()
    answers = [examples[i].response if i % 10 == 0 else f"It returns a list {i}." for i in range(1_000)]
    verdicts = [guard.check(a) for a in answers]
    assert verdicts.count("span") == 100


# -- settings ----------------------------------------------------------------------


def test_leak_guard_settings_load_on_by_default_and_validate(tmp_path: Path) -> None:
    path = tmp_path / "participant.toml"
    path.write_text('participant_id = "alice"\n')
    assert load_participant_settings(path, env={}).leak_guard == LeakGuardTable()
    assert LeakGuardTable().enabled and LeakGuardTable().min_span_tokens == 8
    path.write_text('participant_id = "alice"\n[leak_guard]\nmin_span_tokens = 12\nwithhold_as = "omit"\n')
    loaded = load_participant_settings(path, env={}).leak_guard
    assert (loaded.min_span_tokens, loaded.withhold_as, loaded.index_prompts) == (12, "omit", True)
    for bad in ("min_span_tokens = 1", "max_precision = 1.5", 'withhold_as = "redact"', "min_span = 8"):
        path.write_text(f'participant_id = "alice"\n[leak_guard]\n{bad}\n')
        with pytest.raises(SettingsError, match="leak_guard"):
            load_participant_settings(path, env={})


# -- a participant in a federation -------------------------------------------------------


class WireTap:
    """A participant's transport that keeps a copy of every body it publishes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bodies: list[tuple[str, bytes]] = []

    async def publish(self, exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
        self.bodies.append((routing_key, body))
        await self.inner.publish(exchange, routing_key, body, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def files_holding(secret: bytes, folder: Path, pattern: str) -> list[Path]:
    """The files matching `pattern` in `folder` whose bytes hold `secret`, whatever its case; asserts there
    was one file to look in."""
    files = list(folder.glob(pattern))
    assert files, "no file to look in"
    return [path for path in files if secret.upper() in path.read_bytes().upper()]


def leaker(prompt: str) -> str:
    """A black box that has memorised its private data: odd prompts get the secret back verbatim (or
    shouted), even ones a paraphrase of it."""
    number = int(prompt.removeprefix("Say ").rstrip("."))
    if number % 2:
        return SECRET.response if number % 4 == 1 else SECRET.response.upper()
    return "Patient 4471 keeps a code on a blue card, which is locked in a drawer."


async def test_a_participant_sends_a_blank_for_a_leaking_answer_and_reports_the_count(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["alice", "bob"]))
    coordinator = memory_coordinator(coordinator_config(tmp_path, rounds=1), broker)
    tap = WireTap(broker.connect("alice"))

    def member(name: str, transport: Any, answer: Any) -> Participant:
        settings = ParticipantSettings(
            federation="t", participant_id=name, state_dir=str(tmp_path / name), heartbeat_seconds=0.5
        )
        learner = FunctionLearner(answer, model_id=f"{name}-box")
        return Participant(settings, transport, learner, private_train=PRIVATE if name == "alice" else [])

    alice = member("alice", tap, leaker)
    bob = member("bob", broker.connect("bob"), lambda prompt: f"I would {prompt.lower()}")
    with capture_logs() as logs:
        await coordinator.start()
        runs = [asyncio.create_task(p.run_until(rounds=1)) for p in (alice, bob)]
        await asyncio.wait_for(coordinator.drive(), 60)
        await asyncio.wait_for(asyncio.gather(*runs), 60)
        await coordinator.stop_intake()

    batches = [decode_generation(body) for key, body in tap.bodies if key.startswith("gen.")]
    answers = [a for batch in batches for a in batch.answers]
    assert len(answers) == 4  # the round's 4 prompts, in 2 shards
    odd = {a.prompt_id for a in answers if int(a.prompt_id[1:]) % 2}
    assert odd, "the round should ask at least one odd prompt"
    # leaks went out blank, without token count or log-probability; paraphrases as they were
    for answer in answers:
        if answer.prompt_id in odd:
            assert (answer.text, answer.completion_tokens, answer.logprob) == ("", 0, None)
        else:
            assert answer.text.startswith("Patient 4471 keeps a code")
    (report,) = alice.reports
    assert report.metrics["answers_withheld"] == len(odd)
    assert alice.metrics.registry.get_sample_value("chorus_participant_answers_withheld_total") == len(odd)
    assert bob.reports[0].metrics["answers_withheld"] == 0
    stored = dict(((r, p), m) for r, p, m in coordinator.store.reports())
    assert stored[(1, "alice")]["answers_withheld"] == len(odd)

    # the secret is nowhere: not on the wire, not in the coordinator's state (batches, labels), not logged
    assert tap.bodies and all(b"8KQ2" not in body.upper() for _, body in tap.bodies)
    assert files_holding(b"8KQ2", tmp_path, "*.sqlite3*") == []
    logged = msgspec.json.encode([{k: str(v) for k, v in entry.items()} for entry in logs]).upper()
    assert b"8KQ2" not in logged and b"LOCKED DRAWER" not in logged
    withheld = [e for e in logs if e["event"] == "answers_withheld"]
    assert [(e["participant"], e["withheld"], e["span"]) for e in withheld] == [("alice", len(odd), len(odd))]
    assert withheld[0]["prompt_ids"] == sorted(odd)
    (ready,) = [e for e in logs if e["event"] == "leak_guard_ready" and e["participant"] == "alice"]
    assert ready["examples"] == 2 and ready["enabled"] is True
    answered = {e["participant"]: e["withheld"] for e in logs if e["event"] == "round_answered"}
    assert answered == {"alice": len(odd), "bob": 0}


def test_a_chorus_run_participant_takes_its_own_leak_guard_table(tmp_path: Path) -> None:
    from federation.config import load_run_config
    from federation.data import DataPaths
    from federation.settings import participant_settings

    path = tmp_path / "run.toml"
    path.write_text(
        'prompts_path = "prompts.jsonl"\n'
        '[[participants]]\nid = "a"\nprivate_data = "a.jsonl"\n'
        '[[participants]]\nid = "b"\nprivate_data = "b.jsonl"\n[participants.leak_guard]\nenabled = false\n'
    )
    config = load_run_config(path)
    data = DataPaths(
        tmp_path / "prompts.jsonl",
        {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"},
        {"a": None, "b": None},
    )
    a, b = (participant_settings(config, entry, data, tmp_path) for entry in config.run.participants)
    assert a.leak_guard == LeakGuardTable()  # on unless the entry says otherwise
    assert b.leak_guard == LeakGuardTable(enabled=False)
    path.write_text(
        'prompts_path = "prompts.jsonl"\n[[participants]]\nid = "a"\n'
        "[participants.leak_guard]\nmin_span = 3\n"
    )
    with pytest.raises(SettingsError, match="min_span"):
        load_run_config(path)
