"""`chorus-participant export`: a participant's trained model, loaded in a fresh process by plain
transformers and peft (no Chorus import), writes the same greedy answers the participant wrote.

The bases are the tiny in-process models saved to a folder, as a user's own Hugging Face model would be;
the participants are built from settings as `chorus-participant run` builds them (which records the
base in state_dir/model.json), trained a little, and checkpointed where the service puts round 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from participant.cli import main as participant_main
from participant.data import Example
from participant.export import MODEL_RECORD, ExportError, export_model, portable_base
from participant.learners.local import TrainableLocalLearner
from participant.models import SMOLLM2_HUB_ID, SMOLLM2_SPEC, load_model
from participant.settings import ParticipantSettings, TrainSettings
from participant.wiring import build_learner
from schemas.messages import GenerationParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRIVATE = [Example(prompt=f"What is {i} plus one?", response=f"It is {i + 1}.") for i in range(6)]
PROMPTS = [("q1", "What is 3 plus one?"), ("q2", "Say hello."), ("q3", "Name a colour, please.")]
PARAMS = GenerationParams(max_new_tokens=10)

# What a user writes with the export alone: nothing of Chorus, only its folders.
LOAD_AND_GENERATE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM

torch.manual_seed(0)
jobs = json.loads(sys.argv[1])
answers = {}
for folder, kind, prompts, max_new_tokens in jobs:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if kind == "adapter":
        model = AutoPeftModelForCausalLM.from_pretrained(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    texts = []
    for prompt in prompts:
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
        else:
            ids = tokenizer(prompt + "\n", return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = output[0, ids["input_ids"].shape[1]:]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    answers[folder] = texts
chorus = sorted({m.split(".")[0] for m in sys.modules} & {"participant", "common", "schemas", "coordinator"})
print(json.dumps({"answers": answers, "chorus_modules": chorus}))
"""


def saved_base(tmp_path: Path, spec: str) -> Path:
    """A tiny model saved as a plain Hugging Face folder: the user's own model."""
    folder = tmp_path / f"{spec}-base"
    lm = load_model(spec)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def trained_participant(tmp_path: Path, name: str, base: Path, method: str) -> tuple[Path, list[str]]:
    """Participant `name` built from settings, trained, checkpointed as round 1; its greedy answers."""
    state = tmp_path / name
    settings = ParticipantSettings(
        participant_id=name,
        model=str(base),
        state_dir=str(state),
        generation_batch_size=1,
        progress=False,
        train=TrainSettings(
            method=method,  # type: ignore[arg-type]
            last_layers=1,
            epochs=3,
            learning_rate=1e-2,
            batch_size=3,
            max_length=64,
        ),
    )
    learner = build_learner(settings)
    assert isinstance(learner, TrainableLocalLearner)
    before = [a.text for a in learner.generate(PROMPTS, PARAMS)]
    learner.train(PRIVATE)
    learner.save_checkpoint(state / "checkpoints" / "round-1")
    answers = [a.text for a in learner.generate(PROMPTS, PARAMS)]
    assert answers != before, "training changed nothing: the test would not see a missing adapter"
    return state, answers


def test_exports_load_in_plain_transformers_and_peft_and_answer_as_the_participant(tmp_path: Path) -> None:
    llama, gpt2 = saved_base(tmp_path, "tiny-llama"), saved_base(tmp_path, "tiny-gpt2")
    cases = {
        "adapter": (trained_participant(tmp_path, "alice", llama, "lora"), []),
        "merged": (trained_participant(tmp_path, "bob", gpt2, "lora"), ["--merged"]),
        "last-layers": (trained_participant(tmp_path, "carol", llama, "last_layers"), []),
    }
    jobs, expected = [], {}
    for label, ((state, answers), flags) in cases.items():
        out = tmp_path / "exports" / label
        status = participant_main(["export", "--state-dir", str(state), "--out", str(out), *flags])
        assert status == 0
        described = json.loads((out / "chorus-export.json").read_text())
        assert described["round"] == 1
        kind = described["kind"]
        assert kind == ("adapter" if label == "adapter" else "merged")
        assert (out / "tokenizer_config.json").is_file()
        jobs.append([str(out), kind, [p for _, p in PROMPTS], PARAMS.max_new_tokens])
        expected[str(out)] = answers

    adapter = tmp_path / "exports" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama)  # the path it was given, not a cache
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    template = adapter / "chat_template.jinja"  # or inside tokenizer_config.json, by transformers version
    chat = template.read_text() if template.is_file() else ""
    chat = chat or json.loads((adapter / "tokenizer_config.json").read_text()).get("chat_template", "")
    assert "<|im_start|>" in chat
    for label in ("merged", "last-layers"):
        assert (tmp_path / "exports" / label / "model.safetensors").is_file()
        assert (tmp_path / "exports" / label / "config.json").is_file()

    finished = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, json.dumps(jobs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["chorus_modules"] == []
    assert result["answers"] == expected


def test_round_choice_and_what_cannot_be_exported(tmp_path: Path) -> None:
    base = saved_base(tmp_path, "tiny-gpt2")
    state, _ = trained_participant(tmp_path, "dave", base, "lora")
    with pytest.raises(ExportError, match=r"no checkpoint of round 7 .*rounds there: 1"):
        export_model(state, tmp_path / "out", round_id=7)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not an empty folder"):
        export_model(state, out)
    # An earlier run's archive exports too, its model found beside the runs/ folder.
    archive = state / "runs" / "run-a"
    (archive / "checkpoints").mkdir(parents=True)
    (state / "checkpoints" / "round-1").rename(archive / "checkpoints" / "round-1")
    with pytest.raises(ExportError, match=r"no checkpoints in .*--state-dir .*runs/run-a"):
        export_model(state, tmp_path / "out")
    assert export_model(archive, tmp_path / "out").round_id == 1
    (state / MODEL_RECORD).unlink()
    with pytest.raises(ExportError, match="give --model"):
        export_model(archive, tmp_path / "out2")
    assert export_model(archive, tmp_path / "out2", model=str(base)).kind == "adapter"
    # A folder with nothing to export is one line on stderr and status 1, not a traceback.
    assert participant_main(["export", "--state-dir", str(tmp_path / "nowhere"), "--out", "x"]) == 1


def test_the_built_in_smollm2_exports_under_its_hub_id() -> None:
    assert portable_base(SMOLLM2_SPEC) == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base("/models/mine") == "/models/mine"


@pytest.mark.slow
def test_a_smollm2_adapter_names_the_hub_model_and_no_cache_folder(tmp_path: Path) -> None:
    cache = tmp_path / "private-cache"
    settings = ParticipantSettings(
        participant_id="erin", state_dir=str(tmp_path / "erin"), cache_dir=str(cache), progress=False
    )
    learner = build_learner(settings)  # SmolLM2, converted from its GGUF into `cache`
    assert isinstance(learner, TrainableLocalLearner)
    learner.save_checkpoint(tmp_path / "erin" / "checkpoints" / "round-0")
    out = tmp_path / "out"
    exported = export_model(tmp_path / "erin", out)
    assert exported.kind == "adapter" and exported.note is not None and "GGUF" in exported.note
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".jinja"):
            assert str(cache) not in path.read_text(), path.name
