"""`chorus-coordinator` and `chorus-participant` as a user runs them: console scripts in their own
processes, started from a copy of the shipped examples/coordinator.toml and examples/participant.toml,
against the session's RabbitMQ node.

What a user must see: a short federation that ends with both tools exiting 0; and for a bad settings
file, an unreachable broker or a wrong password, a non-zero exit status (docs/operate.md) and one
paragraph on stderr that says what is wrong and where, never a Python traceback.

The settings and broker failures start all their processes at once (module fixtures), so that the
file's cost is about one process start per group rather than one per case. The settings cases need
no broker and carry no `amqp` mark, so that `make test-fast` runs them too.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.cli_processes import (
    Command,
    Finished,
    add_top_level_keys,
    closed_port,
    commands,
    copy_examples,
    log_events,
    set_key,
    with_password,
)

from broker.local_node import LocalNode
from common.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE

COORDINATOR = "chorus-coordinator"
PARTICIPANT = "chorus-participant"
SETTINGS_FILE = {COORDINATOR: "coordinator.toml", PARTICIPANT: "participant.toml"}  # in examples/
NO_BROKER_IN_ENV = {"CHORUS_BROKER_URL": ""}  # an empty value overrides nothing: the file's URL stands
FAILURE_SECONDS = 60  # a failing command still running after this is hanging: the test fails


def the_error_paragraph(finished: Finished, prog: str) -> str:
    """The command's message on stderr, checked to be one paragraph with no traceback."""
    assert "Traceback" not in finished.stderr, finished
    errors = [line for line in finished.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, finished
    return errors[0]


# ---- a good run ---------------------------------------------------------------------------------------


@pytest.mark.amqp
def test_a_coordinator_and_two_participants_from_the_examples_run_a_federation_and_exit_0(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    tag = secrets.token_hex(3)
    alice, bob = f"alice-{tag}", f"bob-{tag}"  # broker users are node-wide: names no other test uses
    urls = rabbit_vhost(participants=(alice, bob))
    examples = copy_examples(tmp_path)
    coordinator_toml = examples / "coordinator.toml"
    # What differs from the shipped file: an embedder that needs no model export (the hashing one).
    set_key(coordinator_toml, "embedder", "hashing")
    participant_toml = examples / "participant.toml"
    # The participants are generate-only black boxes (`cat` echoes the prompt): no model to load, no
    # evaluation; otherwise the shipped file as it is, one file for both, as README shows.
    add_top_level_keys(participant_toml, command=["cat"], evaluate=False)
    for name, role in ((alice, "alice"), (bob, "bob")):
        (examples / f"private_{name}.jsonl").write_text((examples / f"private_{role}.jsonl").read_text())

    with commands() as started:
        started.append(
            Command(
                COORDINATOR,
                ["run", "--config", str(coordinator_toml), "--broker", urls["coordinator"], "--rounds", "1"],
                workdir=tmp_path / "run",
            )
        )
        for name in (alice, bob):  # the URL from the environment, as README documents
            started.append(
                Command(
                    PARTICIPANT,
                    ["run", "--config", str(participant_toml), "--id", name],
                    workdir=tmp_path / "run",
                    env={"CHORUS_BROKER_URL": urls[name]},
                )
            )
        # Participants stop shortly after the coordinator has said the round was the last.
        coordinator = started[0].wait(timeout=150)
        participants = [command.wait(timeout=FAILURE_SECONDS) for command in started[1:]]

    assert coordinator.returncode == EXIT_OK, coordinator
    assert "Traceback" not in coordinator.stderr, coordinator
    closed = [e for e in log_events(coordinator.stderr) if e["event"] == "round_closed"]
    assert [(e["round"], e["answered"], e["failed_shards"]) for e in closed] == [(1, 2, [])], coordinator
    for participant in participants:
        # Never told the number of rounds: each stopped because the coordinator said it was the last.
        assert participant.returncode == EXIT_OK, participant
        assert "Traceback" not in participant.stderr, participant
        applied = [e["round"] for e in log_events(participant.stderr) if e["event"] == "round_applied"]
        assert applied == [1], participant

    # The state the run left where the shipped file puts it, read back with the CLI.
    status = Command(COORDINATOR, ["status", "--config", str(coordinator_toml)], workdir=tmp_path / "run")
    shown = status.wait(timeout=FAILURE_SECONDS)
    assert shown.returncode == EXIT_OK, shown
    assert (tmp_path / ".chorus" / "coordinator.sqlite3").is_file()
    rows = [line.split() for line in shown.stdout.splitlines() if line.startswith("1 ")]
    assert len(rows) == 4 and all(row[1:4:2] == ["closed", "labelled"] for row in rows), shown
    members = next(line for line in shown.stdout.splitlines() if line.startswith("2 members: "))
    assert sorted(members.removeprefix("2 members: ").split(", ")) == sorted([alice, bob]), shown


# ---- bad settings files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadSettings:
    """A copy of a shipped settings file broken one way, and what the message must say.

    `break_it` changes the file and returns the number of the line it broke (or None); "{line}" in
    `says` stands for it, "{path}" for the file's path.
    """

    prog: str
    break_it: Callable[[Path], int | None]
    says: tuple[str, ...]


def replace_text(old: str, new: str) -> Callable[[Path], int]:
    def change(path: Path) -> int:
        text = path.read_text()
        assert text.count(old) == 1, f"{path} should have one {old!r}"
        path.write_text(text.replace(old, new))
        return text[: text.index(old)].count("\n") + 1

    return change


def set_to(key: str, value: object) -> Callable[[Path], None]:
    return lambda path: set_key(path, key, value)


def remove(path: Path) -> None:
    path.unlink()


def make_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def as_shipped(path: Path) -> None:
    return None


BAD_SETTINGS = {
    "coordinator-toml-syntax": BadSettings(
        COORDINATOR,
        replace_text('federation = "chorus"', 'federation = "chorus'),
        ("{path}", "not valid TOML", "line {line}"),
    ),
    "coordinator-unknown-key": BadSettings(
        COORDINATOR, replace_text("shards = 4", "shard = 4"), ("{path}", "unknown field `shard`", "round")
    ),
    "coordinator-quorum-zero": BadSettings(
        COORDINATOR, set_to("quorum", 0), ("{path}", "quorum must be", "got 0", "round")
    ),
    "coordinator-negative-deadline": BadSettings(
        COORDINATOR, set_to("deadline_seconds", -5.0), ("{path}", "> 0", "round.deadline_seconds")
    ),
    "coordinator-missing-file": BadSettings(COORDINATOR, remove, ("{path}", "does not exist")),
    # A folder is not a settings file: said in one line rather than a traceback (an uncaught OSError).
    "coordinator-file-is-a-folder": BadSettings(
        COORDINATOR, make_folder, ("cannot read settings file {path}", "Is a directory")
    ),
    # The shipped file names no broker: without --broker or CHORUS_BROKER_URL there is none to use.
    "coordinator-no-broker": BadSettings(
        COORDINATOR, as_shipped, ("in-memory broker", "--broker", "CHORUS_BROKER_URL", "broker_url")
    ),
    "participant-toml-syntax": BadSettings(
        PARTICIPANT,
        replace_text('federation = "chorus"', 'federation = "chorus'),
        ("{path}", "not valid TOML", "line {line}"),
    ),
    "participant-unknown-key": BadSettings(
        PARTICIPANT, replace_text("rank = 8", "rnak = 8"), ("{path}", "unknown field `rnak`", "train")
    ),
    "participant-batch-size-zero": BadSettings(
        PARTICIPANT, set_to("generation_batch_size", 0), ("{path}", ">= 1", "generation_batch_size")
    ),
    "participant-negative-learning-rate": BadSettings(
        PARTICIPANT, set_to("learning_rate", -0.1), ("{path}", "> 0", "train.learning_rate")
    ),
    "participant-missing-file": BadSettings(PARTICIPANT, remove, ("{path}", "does not exist")),
    "participant-no-broker": BadSettings(
        PARTICIPANT, as_shipped, ("in-memory broker", "--broker", "CHORUS_BROKER_URL", "broker_url")
    ),
}


@pytest.fixture(scope="module")
def bad_settings_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[list[str], Finished]]]:
    """Each case's expected message fragments and what its command did; all cases run at the same time."""
    with commands() as started:
        expected = {}
        for name, case in BAD_SETTINGS.items():
            examples = copy_examples(tmp_path_factory.mktemp(name))
            path = examples / SETTINGS_FILE[case.prog]
            line = case.break_it(path)
            expected[name] = [fragment.format(path=path, line=line) for fragment in case.says]
            args = ["run", "--config", str(path)]
            started.append(Command(case.prog, args, workdir=examples.parent, env=NO_BROKER_IN_ENV))
        yield {
            name: (expected[name], command.wait(FAILURE_SECONDS))
            for name, command in zip(BAD_SETTINGS, started, strict=True)
        }


@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_a_bad_settings_file_exits_with_one_paragraph_naming_the_file_and_the_problem(
    name: str, bad_settings_runs: dict[str, tuple[list[str], Finished]]
) -> None:
    case = BAD_SETTINGS[name]
    says, finished = bad_settings_runs[name]
    assert finished.returncode == EXIT_USAGE, finished
    message = the_error_paragraph(finished, case.prog)
    assert finished.stderr.strip() == message, finished  # and nothing else
    for fragment in says:
        assert fragment in message, f"{fragment!r} not in the message:\n{finished}"
    # Nothing was started: no state database or records where the shipped file puts them.
    assert not (Path(finished.cwd) / ".chorus").exists(), finished


def test_the_shipped_examples_themselves_are_valid_settings() -> None:
    from coordinator.settings import load_coordinator_settings
    from participant.settings import load_participant_settings

    examples = Path(__file__).resolve().parents[1] / "examples"
    coordinator = load_coordinator_settings(examples / "coordinator.toml", env={})
    assert Path(coordinator.prompts_path).is_file()
    for name in ("alice", "bob"):
        participant = load_participant_settings(examples / "participant.toml", env={}, participant_id=name)
        assert participant.private_data is not None and Path(participant.private_data).is_file()


# ---- the broker: unreachable, and a wrong password ----------------------------------------------------


@dataclass(frozen=True)
class BrokerFailure:
    prog: str
    user: str  # the login in the URL
    url: str
    extra_args: tuple[str, ...] = ()


# Case name -> the case, what its command did, and the model cache it was given.
BrokerFailureRuns = dict[str, tuple[BrokerFailure, Finished, Path]]


@pytest.fixture(scope="module")
def broker_failures(
    rabbit_node: LocalNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerFailureRuns]:
    """Coordinator and participant, each against a closed port and with a wrong password, at once.

    Each runs its shipped file as it is, with an empty model cache ($CHORUS_CACHE_DIR): the failure must
    come before any model is loaded, that is before SmolLM2 or the ONNX encoder is written there.
    """
    port = closed_port()
    alice = f"alice-{secrets.token_hex(3)}"
    urls = rabbit_node.add_vhost(f"test-{secrets.token_hex(4)}", (alice,))
    wrong_password = f"not-{secrets.token_hex(8)}"  # no test path holds it, unlike "wrong-password"
    wrong = {user: with_password(url, wrong_password) for user, url in urls.items()}
    cases = {
        "coordinator-closed-port": BrokerFailure(
            COORDINATOR, "coordinator", f"amqp://coordinator:any-password@127.0.0.1:{port}/chorus"
        ),
        "participant-closed-port": BrokerFailure(
            PARTICIPANT, "alice", f"amqp://alice:any-password@127.0.0.1:{port}/chorus", ("--id", "alice")
        ),
        "coordinator-wrong-password": BrokerFailure(COORDINATOR, "coordinator", wrong["coordinator"]),
        "participant-wrong-password": BrokerFailure(PARTICIPANT, alice, wrong[alice], ("--id", alice)),
    }
    with commands() as started:
        caches = {}
        for name, case in cases.items():
            examples = copy_examples(tmp_path_factory.mktemp(name))
            (examples / f"private_{alice}.jsonl").write_text((examples / "private_alice.jsonl").read_text())
            caches[name] = examples.parent / "model-cache"
            caches[name].mkdir()
            config = examples / SETTINGS_FILE[case.prog]
            args = ["run", "--config", str(config), "--broker", case.url, *case.extra_args]
            started.append(
                Command(case.prog, args, workdir=examples.parent, env={"CHORUS_CACHE_DIR": str(caches[name])})
            )
        yield {
            name: (case, command.wait(FAILURE_SECONDS), caches[name])
            for (name, case), command in zip(cases.items(), started, strict=True)
        }


# What the message must say, beyond exit status 1, one paragraph, no traceback and no password.
BROKER_FAILURE_SAYS = {
    "closed-port": ("cannot connect to RabbitMQ at amqp://127.0.0.1:{port} ", "is the broker running", "URL"),
    "wrong-password": ("refused the login at amqp://127.0.0.1:{port} ", "as user {user!r}", "the password"),
}


@pytest.mark.amqp
@pytest.mark.parametrize("failure", BROKER_FAILURE_SAYS)
@pytest.mark.parametrize("prog", [COORDINATOR, PARTICIPANT])
def test_a_broker_that_cannot_be_used_is_named_with_what_to_check_before_any_model_loads(
    prog: str, failure: str, broker_failures: BrokerFailureRuns
) -> None:
    case, finished, cache = broker_failures[f"{prog.removeprefix('chorus-')}-{failure}"]
    assert finished.returncode == EXIT_FAILED, finished
    message = the_error_paragraph(finished, prog)
    for fragment in BROKER_FAILURE_SAYS[failure]:
        assert fragment.format(port=urlsplit(case.url).port, user=case.user) in message, finished
    password = urlsplit(case.url).password
    assert password and password not in finished.stderr, finished
    assert list(cache.iterdir()) == [], f"a model was loaded before the broker was tried:\n{finished}"
