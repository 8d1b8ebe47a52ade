"""Learner kinds: a black box starts without torch, settings pick one kind by registry, and your own
Python learner object takes part through chorus-participant's settings and chorus-run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import msgspec
import pytest
from structlog.testing import capture_logs

import participant
import participant.cli
from broker.memory import MemoryBroker
from broker.topology import LOBBY_QUEUE, full_topology
from broker.transport import Delivery
from federation import cli
from participant.data import Example
from participant.learner import FunctionLearner, GeneratedAnswer, Learner, LearnerError, PromptBatch, trainer
from participant.learners import KINDS, learner_kind
from participant.service import Participant
from participant.settings import ParticipantSettings, SettingsError, TrainSettings, load_participant_settings
from participant.wiring import build_learner
from schemas.codec import decode_control
from schemas.messages import GenerationParams, Join, Message

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_learner.py"
HEAVY = ("torch", "transformers", "peft", "safetensors")

pytestmark = pytest.mark.usefixtures("restore_logging")

# Starts a command black box's participant on the in-memory broker: settings, learner, service, Join.
START_A_BLACK_BOX = """
import asyncio, json, sys
from pathlib import Path
from broker.memory import MemoryBroker
from broker.topology import full_topology
import participant.cli
from participant.service import Participant
from participant.settings import load_participant_settings
from participant.wiring import build_learner
from schemas.messages import GenerationParams

async def main():
    settings = load_participant_settings(Path(sys.argv[1]), env={})
    learner = build_learner(settings)
    [answer] = learner.generate([("p1", "hello")], GenerationParams())
    broker = MemoryBroker()
    broker.declare(full_topology([settings.participant_id]))
    service = Participant(settings, broker.connect(settings.participant_id), learner)
    await service.start()
    await service.stop()
    return answer.text

text = asyncio.run(main())
print(json.dumps({"answer": text, "modules": sorted(sys.modules)}))
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "learner",
    [
        f'command = ["{sys.executable}", "-c", "import sys; print(sys.stdin.read()[::-1])"]\n',
        f'learner = "{EXAMPLE}:make_learner"\n',
    ],
    ids=["command", "python"],
)
def test_a_black_box_participant_starts_without_torch(tmp_path: Path, learner: str) -> None:
    config = write(
        tmp_path / "participant.toml",
        f'participant_id = "box"\nstate_dir = "{tmp_path / "state"}"\nprogress = false\n{learner}',
    )
    found = subprocess.run(
        [sys.executable, "-c", START_A_BLACK_BOX, str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result = json.loads(found.stdout.splitlines()[-1])
    assert result["answer"] in ("olleh", "nothing learned yet")
    assert [m for m in result["modules"] if m.split(".")[0] in HEAVY] == []


def test_an_http_learner_is_built_without_torch() -> None:
    code = (
        "import json, sys\n"
        "from participant.settings import ParticipantSettings, HttpTable\n"
        "from participant.wiring import build_learner\n"
        "http = HttpTable(base_url='http://127.0.0.1:9/v1', model='m')\n"
        "build_learner(ParticipantSettings(participant_id='box', http=http))\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert [m for m in json.loads(found.stdout.splitlines()[-1]) if m.split(".")[0] in HEAVY] == []


def test_every_train_method_has_a_kind() -> None:
    methods = typing.get_args(typing.get_type_hints(TrainSettings)["method"])
    assert sorted(methods) == sorted(kind.method for kind in KINDS.values() if kind.method is not None)


@pytest.mark.parametrize("method", ["lora", "last_layers", "none"])
def test_a_local_learner_trains_with_the_train_table_the_file_gives(tmp_path: Path, method: str) -> None:
    # one type from the file to the training loop: no copy in between to drop a key or default it again
    text = (
        f'participant_id = "p"\nmodel = "tiny-llama"\nstate_dir = "{tmp_path}"\n'
        f'[train]\nmethod = "{method}"\nrank = 4\nmax_grad_norm = 0.5\nmax_length = 64\nlast_layers = 1\n'
    )
    settings = load_participant_settings(write(tmp_path / "p.toml", text), env={})
    learner = build_learner(settings)
    assert learner.settings == settings.train  # type: ignore[attr-defined]
    plain = load_participant_settings(write(tmp_path / "plain.toml", 'participant_id = "p"\n'), env={})
    assert plain.train == TrainSettings() == ParticipantSettings(participant_id="p").train


@pytest.mark.parametrize(
    ("given", "kind"),
    [
        ({}, "lora"),
        ({"train": TrainSettings(method="last_layers")}, "last_layers"),
        ({"train": TrainSettings(method="none")}, "frozen"),
        ({"command": ["answer"]}, "command"),
        ({"command": ["answer"], "model_id": "mine"}, "command"),
        ({"learner": "mine.model:make"}, "python"),
        ({"learner": "mine.py:make", "model_id": "mine"}, "python"),
    ],
)
def test_the_settings_pick_one_kind(given: dict[str, object], kind: str) -> None:
    assert learner_kind(ParticipantSettings(participant_id="p", **given)) == kind  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('command = ["a"]\nlearner = "m:f"\n', "give either command or learner for the learner, not both"),
        ('learner = "m:f"\n[http]\nbase_url = "http://h/v1"\nmodel = "m"\n', "either [http] or learner"),
        ('model_id = "x"\n', "model_id names a `command` black box or a Python `learner` object"),
        ('learner = "no colon"\n', "learner"),
    ],
)
def test_a_clash_between_kinds_says_what_to_write(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_participant_settings(write(tmp_path / "p.toml", 'participant_id = "p"\n' + text), env={})


def test_a_python_learner_file_is_found_beside_the_settings_and_learns(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(EXAMPLE.read_text())
    settings = load_participant_settings(
        write(tmp_path / "p.toml", 'participant_id = "p"\nlearner = "mine.py:make_learner"\n'), env={}
    )
    assert settings.learner == f"{tmp_path / 'mine.py'}:make_learner"
    learner = build_learner(settings)
    assert learner.model_id == "bag-of-words" and trainer(learner) is learner
    stats = learner.train([Example("a b", "c d c")])
    assert stats is not None and stats.samples == 1
    learner.save_checkpoint(tmp_path / "ckpt")
    fresh = trainer(build_learner(settings))
    assert fresh is not None
    assert fresh.load_checkpoint(tmp_path / "ckpt") and not fresh.load_checkpoint(tmp_path / "none")
    [answer] = fresh.generate([("1", "a")], GenerationParams())
    assert answer.text == "c d"


def test_a_python_learner_that_is_not_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def make(settings):\n    return object()\n")
    settings = ParticipantSettings(participant_id="p", learner=f"{tmp_path / 'bad.py'}:make")
    with pytest.raises(LearnerError, match="returned an object of type object without model_id"):
        build_learner(settings)
    with pytest.raises(LearnerError, match="has no 'absent'"):
        build_learner(msgspec.structs.replace(settings, learner=f"{tmp_path / 'bad.py'}:absent"))


HALF_A_TRAINER = """
class Half:
    model_id = "half"
    def generate(self, prompts, params):
        return []
    def train(self, examples):
        return None
def make(settings):
    return Half()
"""


def test_a_capability_is_all_its_methods_and_half_of_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "half.py").write_text(HALF_A_TRAINER)
    settings = ParticipantSettings(participant_id="p", learner=f"{tmp_path / 'half.py'}:make")
    with pytest.raises(LearnerError, match="with train but not save_checkpoint, load_checkpoint"):
        build_learner(settings)
    answers_only = FunctionLearner(lambda prompt: prompt, "echo")
    assert trainer(answers_only) is None and isinstance(answers_only, Learner)


class OlderBlackBox:
    """A learner written to the protocol before capabilities: a flag beside methods that do nothing."""

    model_id = "older"
    can_train = False

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        return [GeneratedAnswer(pid, "an answer", 0, 0) for pid, _ in prompts]

    def train(self, examples: Sequence[Example]) -> None:
        raise AssertionError("a learner that says it cannot train was trained")

    def save_checkpoint(self, directory: Path) -> None:
        raise AssertionError("a learner that says it cannot train was checkpointed")

    def load_checkpoint(self, directory: Path) -> bool:
        raise AssertionError("a learner that says it cannot train was restored")


async def test_a_learner_with_can_train_false_still_only_answers(tmp_path: Path) -> None:
    assert trainer(OlderBlackBox()) is None
    settings = ParticipantSettings(participant_id="p", state_dir=str(tmp_path))
    broker = MemoryBroker()
    broker.declare(full_topology(["p"]))
    service = Participant(settings, broker.connect("p"), OlderBlackBox(), private_train=[Example("a", "b")])
    joins: list[Message] = []

    async def take(delivery: Delivery) -> None:
        joins.append(decode_control(delivery.body))
        await delivery.ack()

    await broker.connect("coordinator").consume(LOBBY_QUEUE, take, prefetch=10)
    with capture_logs() as logs:
        await service.start()  # would warm up (train) a learner that trains, with private data given
        await service.stop()
    assert "warm_up" not in [line["event"] for line in logs]
    for _ in range(100):
        if joins:
            break
        await asyncio.sleep(0.01)
    assert [type(m) for m in joins] == [Join] and not cast(Join, joins[0]).can_train


def test_chorus_run_federates_your_own_learner_objects(tmp_path: Path) -> None:
    config = write(
        tmp_path / "run.toml",
        'federation = "own"\nrounds = 1\nembedder = "hashing"\n'
        '[task]\nfamilies = ["text", "data"]\nmax_public = 4\nmax_train = 4\nmax_test = 2\n'
        "[coordinator.round]\nprompts_per_round = 2\nshards = 1\nquorum = 2\ndeadline_seconds = 60.0\n"
        "grace_seconds = 0.0\n"
        "[coordinator.consensus]\nmin_confidence = -1.0\noutlier_similarity = -1.0\n"
        "support_similarity = -1.0\n"
        + "".join(
            f'[[participants]]\nid = "{pid}"\nlearner = "{EXAMPLE}:make_learner"\n' for pid in ("ann", "bo")
        ),
    )
    results = tmp_path / "results"
    assert cli.main([str(config), "--results", str(results)]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and set(summary["participants"]) == {"ann", "bo"}


def test_participant_run_takes_part_with_your_learner_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`participant.run(learner, settings)` connects, joins with the learner's model id, and closes."""
    broker = MemoryBroker()
    broker.declare(full_topology(["box"]))
    monkeypatch.setattr(
        participant.cli, "open_transport", lambda url, *, user, connection_name: broker.connect(user)
    )
    settings = ParticipantSettings(
        participant_id="box", broker_url="amqp://box:secret@127.0.0.1:5672/chorus", state_dir=str(tmp_path)
    )
    mine = FunctionLearner(lambda prompt: prompt[::-1], model_id="mine")
    with capture_logs() as logs:
        assert participant.run(mine, settings, rounds=0) is False  # rounds=0: join, then leave
    [joined] = [entry for entry in logs if entry["event"] == "participant_joined"]
    assert joined["model"] == "mine" and broker.queue_depth(LOBBY_QUEUE) >= 1  # the Join waits there
