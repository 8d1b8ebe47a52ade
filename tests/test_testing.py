"""participant.testing: the shipped scripted participant runs a coordinator end to end, and loads no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from msgspec.structs import replace
from support.coordinators import memory_coordinator, run_with_participants, write_config

from broker.memory import MemoryBroker
from broker.topology import full_topology
from participant.testing import ScriptedParticipant
from schemas import GenerationBatch, PromptShard, RoundOpened


def agreeing(participant_id: str, prompt_id: str) -> str:
    return f"The answer to {prompt_id} is four."


class Contrarian(ScriptedParticipant):
    """What a user's test double looks like: override `batch` to send something else."""

    def batch(self, opened: RoundOpened, shard: PromptShard) -> GenerationBatch:
        honest = super().batch(opened, shard)
        answers = [replace(answer, text="purple zebra xylophone") for answer in honest.answers]
        return replace(honest, answers=answers)


async def test_scripted_participants_get_labels_and_closings_from_a_coordinator(tmp_path: Path) -> None:
    broker = MemoryBroker()
    names = ["alice", "bob", "carol", "dave"]
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=4, quorum=4), broker)
    participants = [ScriptedParticipant(n, broker.connect(n), agreeing) for n in names[:3]]
    participants.append(Contrarian("dave", broker.connect("dave"), agreeing))
    await run_with_participants(coordinator, participants)
    for participant in participants:
        assert [o.round_id for o in participant.opened] == [1]
        assert len(participant.labels) == 3  # one PseudoLabels per shard
        assert participant.closing(1) is not None
        assert len(participant.confirmed) == 3 and participant.errors == []
    texts = {label.text for m in participants[0].labels.values() for label in m.labels}
    assert texts and all("is four" in text for text in texts)  # the contrarian's answer never labels
    assert all(label.source != "dave" for m in participants[0].labels.values() for label in m.labels)


def test_importing_the_testing_helpers_loads_no_torch() -> None:
    code = "import json, sys\nimport participant.testing\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert [m for m in loaded if m.split(".")[0] in ("torch", "transformers", "peft")] == []
