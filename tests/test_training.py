"""LoRA fine-tuning: response-only loss, lower loss after training, repeatable runs, adapter round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from participant.data import DataError, Example, load_jsonl, train_test_split
from participant.generation import generate_answers
from participant.models import load_model, prompt_token_ids
from participant.settings import TrainSettings
from participant.training import (
    IGNORE_INDEX,
    adapter_state,
    attach_lora,
    build_batch,
    encode_example,
    finetune,
    load_adapter,
    load_adapter_state,
    mean_response_loss,
    save_adapter,
)
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

EXAMPLES = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)]
FAST = TrainSettings(rank=4, alpha=8, epochs=2, learning_rate=5e-3, batch_size=4, max_length=96, seed=7)
GREEDY = GenerationParams(max_new_tokens=6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_labels_mask_exactly_the_prompt_and_padding(spec: str) -> None:
    lm = load_model(spec)
    short, long = Example("Hi", "Yo"), Example("A much longer prompt here", "And a longer answer too")
    encoded = [encode_example(lm, e, max_length=256) for e in (short, long)]
    batch = build_batch(encoded, pad_token_id=0)
    for row, (example, enc) in enumerate(zip((short, long), encoded, strict=True)):
        prompt_ids = prompt_token_ids(lm, example.prompt)
        assert enc.prompt_length == len(prompt_ids)
        assert enc.input_ids[: enc.prompt_length] == prompt_ids  # the prompt exactly as generation sees it
        length = len(enc.input_ids)
        labels = batch.labels[row]
        assert (labels[: enc.prompt_length] == IGNORE_INDEX).all()
        assert torch.equal(
            labels[enc.prompt_length : length], torch.tensor(enc.input_ids[enc.prompt_length :])
        )
        assert (labels[enc.prompt_length : length] != IGNORE_INDEX).all()
        assert (labels[length:] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].sum() == length
    # The response ends the turn, so the model learns to stop.
    last = encoded[0].input_ids[-1] if spec == "tiny-gpt2" else encoded[0].input_ids[-2]
    assert last == lm.tokenizer.eos_token_id


def test_overlong_examples_keep_the_prompt_end_and_most_of_the_response() -> None:
    lm = load_model("tiny-gpt2")  # one token per character
    encoded = encode_example(lm, Example("p" * 100, "r" * 100), max_length=50)
    assert len(encoded.input_ids) == 50
    assert encoded.prompt_length == 25  # the response keeps at least half the room
    assert lm.tokenizer.decode(encoded.input_ids[:25]) == "p" * 24 + "\n"


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_finetuning_lowers_response_loss(spec: str) -> None:
    lm = load_model(spec)
    before = mean_response_loss(lm, EXAMPLES)
    stats = finetune(lm, EXAMPLES, FAST)
    after = mean_response_loss(lm, EXAMPLES)
    assert after < before - 0.2
    assert stats.samples == 24 and stats.steps == 6 and stats.response_tokens > 0
    assert not lm.model.training


def test_only_the_adapter_trains() -> None:
    lm = load_model("tiny-llama")
    base_before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    finetune(lm, EXAMPLES, FAST)
    trainable = {name for name, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    base_after = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in lm.model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert base_after.keys() == base_before.keys()
    for name, before in base_before.items():
        assert torch.equal(before, base_after[name]), name


def test_seeded_runs_repeat_exactly() -> None:
    runs = []
    for _ in range(2):
        lm = load_model("tiny-gpt2")
        stats = finetune(lm, EXAMPLES, FAST)
        runs.append((stats.mean_loss, stats.final_loss, adapter_state(lm)))
    (loss_a, final_a, state_a), (loss_b, final_b, state_b) = runs
    assert (loss_a, final_a) == (loss_b, final_b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_zero_weight_examples_do_not_move_the_adapter() -> None:
    lm = load_model("tiny-llama")
    attach_lora(lm, FAST)
    before = adapter_state(lm)
    finetune(lm, [Example(e.prompt, e.response, weight=0.0) for e in EXAMPLES], FAST)
    after = adapter_state(lm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saved_adapter_restores_outputs(tmp_path: Path) -> None:
    trained = load_model("tiny-gpt2")
    finetune(trained, EXAMPLES, FAST)
    prompts = [("a", "What is 3 plus 3?"), ("b", "Hello")]
    expected = (mean_response_loss(trained, EXAMPLES), generate_answers(trained, prompts, GREEDY))
    save_adapter(trained, tmp_path / "round-1")

    fresh = load_model("tiny-gpt2")  # no adapter yet: loading attaches it
    assert mean_response_loss(fresh, EXAMPLES) != expected[0]
    load_adapter(fresh, tmp_path / "round-1")
    assert (mean_response_loss(fresh, EXAMPLES), generate_answers(fresh, prompts, GREEDY)) == expected

    attached = load_model("tiny-gpt2")  # an adapter already attached: loading overwrites its weights
    attach_lora(attached, FAST)
    load_adapter(attached, tmp_path / "round-1")
    assert (mean_response_loss(attached, EXAMPLES), generate_answers(attached, prompts, GREEDY)) == expected

    save_adapter(attached, tmp_path / "round-1")  # overwriting a checkpoint replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1"]


def test_adapter_state_round_trip_and_mismatch() -> None:
    source = load_model("tiny-llama")
    finetune(source, EXAMPLES, FAST)
    state = adapter_state(source)
    target = load_model("tiny-llama")
    attach_lora(target, FAST)
    load_adapter_state(target, state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state(target).items())

    other_rank = load_model("tiny-llama")
    attach_lora(other_rank, TrainSettings(rank=2))
    with pytest.raises(ChorusError, match="shape"):
        load_adapter_state(other_rank, state)
    other_model = load_model("tiny-gpt2")
    attach_lora(other_model, FAST)
    with pytest.raises(ChorusError, match="does not fit"):
        load_adapter_state(other_model, state)


def test_invalid_settings_are_rejected() -> None:
    # built in Python, not decoded from a file: the training entry points hold it to the file's limits
    with pytest.raises(ChorusError, match="rank"):
        attach_lora(load_model("tiny-gpt2"), TrainSettings(rank=0))
    with pytest.raises(ChorusError, match="max_grad_norm"):
        finetune(load_model("tiny-gpt2"), EXAMPLES, TrainSettings(max_grad_norm=0.0))
    with pytest.raises(ValueError, match="finite"):
        TrainSettings(learning_rate=float("inf"))
    with pytest.raises(ChorusError, match="already has"):
        lm = load_model("tiny-gpt2")
        attach_lora(lm, FAST)
        attach_lora(lm, FAST)


# ---- the training data itself --------------------------------------------------------------------


def test_jsonl_loading_and_errors_name_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d", "weight": 0.5}\n')
    assert load_jsonl(good) == [Example("a", "b"), Example("c", "d", 0.5)]
    for line, problem in [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "JSON object"),
        ('{"prompt": "a"}', "'response'"),
        ('{"prompt": "a", "response": 3}', "strings"),
        ('{"prompt": "a", "response": "b", "weight": -1}', "weight"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "ok", "response": "ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{problem}"):
            load_jsonl(bad)
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_train_test_split_is_seeded_and_disjoint() -> None:
    examples = [Example(str(i), str(i)) for i in range(10)]
    train, test = train_test_split(examples, test_fraction=0.3, seed=4)
    assert (len(train), len(test)) == (7, 3)
    assert sorted(train + test, key=lambda e: int(e.prompt)) == examples
    assert (train, test) == train_test_split(examples, test_fraction=0.3, seed=4)
    assert test != train_test_split(examples, test_fraction=0.3, seed=5)[1]
    assert len(train_test_split(examples[:2], test_fraction=0.1)[1]) == 1
