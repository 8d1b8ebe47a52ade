"""Where a local model runs and in what: participant.models.resolve_device and resolve_dtype, the `device`
and `dtype` settings, and every local
learner's work (generate, train, score, checkpoints, adapters to and from the wire) on each device this
machine has. On a CPU-only machine that is the CPU alone; where torch sees a CUDA GPU the same tests
also run there and must agree with the CPU."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from federation.config import RunConfig
from participant.adapters import tensors_from_wire, tensors_to_wire
from participant.data import Example
from participant.last_layers import LastLayersLearner
from participant.learner import FrozenLearner, LoraLearner
from participant.models import ModelError, bfloat16_is_native, load_model, resolve_device, resolve_dtype
from participant.scoring import response_nll
from participant.settings import ParticipantSettings, TrainSettings
from participant.wiring import build_learner
from schemas.messages import GenerationParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EXAMPLES = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(6)]
PROMPTS = [("p1", "What is 1 plus 1?"), ("p2", "Name a colour."), ("p3", "Say hi.")]
GREEDY = GenerationParams(max_new_tokens=6, temperature=0.0)
SETTINGS = TrainSettings(epochs=2, batch_size=4, learning_rate=5e-3, max_length=64)


def test_auto_takes_a_gpu_only_where_torch_sees_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_asking_for_a_gpu_on_a_machine_without_one_says_so_and_how_to_fix_it() -> None:
    with pytest.raises(ModelError, match=r"sees no CUDA GPU.*device = \"cpu\".*\"auto\""):
        load_model("tiny-llama", device="cuda")


def test_a_gpu_index_beyond_the_machine_is_refused_with_the_count() -> None:
    with pytest.raises(ModelError, match="cuda:7"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x"])
def test_an_unknown_device_is_refused_by_the_settings_naming_the_key(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.device"):
        msgspec.convert({"participant_id": "p1", "device": name}, ParticipantSettings)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.device"):
        msgspec.convert({"participants": [{"id": "p1"}], "device": name}, RunConfig)
    with pytest.raises(ModelError, match="device"):
        resolve_device(name)


def test_bfloat16_only_where_the_cpu_computes_it_and_a_clear_refusal_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cpu) is torch.float32
    with pytest.raises(ModelError, match=r"neither AMX nor AVX-512 BF16.*dtype = \"float32\".*\"auto\""):
        resolve_dtype("bfloat16", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cpu) is torch.bfloat16 is resolve_dtype("bfloat16", cpu)
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("float16", cpu)


def test_a_dtype_the_settings_cannot_take_names_the_key() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.dtype"):
        msgspec.convert({"participant_id": "p1", "dtype": "float16"}, ParticipantSettings)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.dtype"):
        msgspec.convert({"participants": [{"id": "p1"}], "dtype": "half"}, RunConfig)
    with pytest.raises(msgspec.ValidationError, match="last_layers"):
        msgspec.convert(
            {"participant_id": "p1", "dtype": "bfloat16", "train": {"method": "last_layers"}},
            ParticipantSettings,
        )


def test_auto_dtype_trains_lora_in_bfloat16_where_native_with_the_adapter_in_float32(tmp_path: Path) -> None:
    settings = ParticipantSettings(
        participant_id="p", model="tiny-llama", dtype="auto", state_dir=str(tmp_path), train=SETTINGS
    )
    learner = build_learner(settings)
    assert isinstance(learner, LoraLearner)
    native = bfloat16_is_native(torch.device("cpu"))
    frozen = {p.dtype for p in learner.lm.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if native else torch.float32}
    assert {p.dtype for p in learner.lm.model.parameters() if p.requires_grad} == {torch.float32}
    before = response_nll(learner.lm, EXAMPLES, max_length=64)
    learner.train(EXAMPLES)
    assert sum(response_nll(learner.lm, EXAMPLES, max_length=64)) < sum(before)
    assert len(learner.generate(PROMPTS, GREEDY)) == 3
    # last_layers trains whole blocks: "auto" keeps them float32
    whole = msgspec.structs.replace(settings, train=TrainSettings(method="last_layers", last_layers=1))
    assert {p.dtype for p in build_learner(whole).lm.model.parameters()} == {torch.float32}  # type: ignore[attr-defined]


@pytest.mark.parametrize("device", DEVICES)
def test_a_lora_learner_generates_trains_scores_and_checkpoints_on_its_device(
    device: str, tmp_path: Path
) -> None:
    learner = LoraLearner(load_model("tiny-llama", device=device), SETTINGS)
    assert learner.lm.device.type == device
    before = response_nll(learner.lm, EXAMPLES, max_length=64)
    stats = learner.train(EXAMPLES)
    after = response_nll(learner.lm, EXAMPLES, max_length=64)
    assert stats.steps == 4
    assert sum(after) < sum(before)  # it learned the examples it was trained on
    answers = learner.generate(PROMPTS, GREEDY)
    assert [a.prompt_id for a in answers] == ["p1", "p2", "p3"]
    # The adapter leaves the device as CPU tensors (what the wire and FedAvg need) and comes back.
    state = learner.adapter_state()
    assert {t.device.type for t in state.values()} == {"cpu"}
    learner.save_checkpoint(tmp_path / "adapter")
    fresh = LoraLearner(load_model("tiny-llama", device=device), SETTINGS)
    fresh.load_adapter_state(tensors_from_wire(tensors_to_wire(state)))
    assert response_nll(fresh.lm, EXAMPLES, max_length=64) == pytest.approx(after, rel=1e-5)
    reloaded = LoraLearner(load_model("tiny-llama", device=device), SETTINGS)
    assert reloaded.load_checkpoint(tmp_path / "adapter")
    assert [a.text for a in reloaded.generate(PROMPTS, GREEDY)] == [a.text for a in answers]


@pytest.mark.parametrize("device", DEVICES)
def test_a_last_layers_learner_trains_and_restores_its_blocks_on_its_device(
    device: str, tmp_path: Path
) -> None:
    learner = LastLayersLearner(load_model("tiny-gpt2", device=device), 1, SETTINGS)
    before = response_nll(learner.lm, EXAMPLES, max_length=64)
    learner.train(EXAMPLES)
    after = response_nll(learner.lm, EXAMPLES, max_length=64)
    assert sum(after) < sum(before)
    learner.save_checkpoint(tmp_path / "blocks")
    restored = LastLayersLearner(load_model("tiny-gpt2", device=device), 1, SETTINGS)
    assert restored.load_checkpoint(tmp_path / "blocks")
    assert response_nll(restored.lm, EXAMPLES, max_length=64) == pytest.approx(after, rel=1e-5)
    frozen = FrozenLearner(load_model("tiny-gpt2", device=device), None, batch_size=4, progress=False)
    assert len(frozen.generate(PROMPTS, GREEDY)) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares a GPU with the CPU")
def test_the_gpu_scores_and_answers_as_the_cpu_does() -> None:
    on_cpu, on_gpu = load_model("tiny-llama"), load_model("tiny-llama", device="cuda")
    assert response_nll(on_gpu, EXAMPLES, max_length=64) == pytest.approx(
        response_nll(on_cpu, EXAMPLES, max_length=64), rel=1e-3
    )
