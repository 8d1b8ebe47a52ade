"""Batched generation: answers stay with their prompt ids whatever the padding; token counts are real."""

from __future__ import annotations

import pytest
import torch

from participant.generation import GeneratedAnswer, generate_answers
from participant.models import load_model, max_positions, prompt_token_ids
from schemas.messages import Answer, GenerationParams

# Deliberately unsorted lengths, so batching reorders them and padding differs row to row.
PROMPTS = [
    ("medium", "Tell me about the sea and the sky."),
    ("tiny", "Hi"),
    ("long", "Explain, in a few careful words, why the sky is blue on most days but red at dusk."),
    ("empty", ""),
    ("short", "Name a colour."),
    ("mid-2", "What is seven times six?"),
    ("long-2", "Write one sentence about a cat who sits on a warm mat by the fire in winter."),
]
GREEDY = GenerationParams(max_new_tokens=10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_batched_answers_match_one_at_a_time_answers(spec: str) -> None:
    lm = load_model(spec)
    batched = generate_answers(lm, PROMPTS, GREEDY, batch_size=3)
    one_by_one = [generate_answers(lm, [prompt], GREEDY, batch_size=1)[0] for prompt in PROMPTS]
    assert [a.prompt_id for a in batched] == [prompt_id for prompt_id, _ in PROMPTS]
    assert batched == one_by_one
    assert len({a.text for a in batched}) == len(PROMPTS)  # the answers really differ per prompt
    for answer, (_, text) in zip(batched, PROMPTS, strict=True):
        assert answer.prompt_tokens == len(prompt_token_ids(lm, text))


def test_answers_stop_at_eos_and_count_no_padding() -> None:
    lm = load_model("tiny-gpt2")  # one token per character, so text positions are token positions
    free = generate_answers(lm, PROMPTS, GREEDY, batch_size=4)
    assert all(a.completion_tokens == GREEDY.max_new_tokens for a in free)
    # Make a character the first answer produces mid-way an extra stop token, then regenerate in one batch:
    # rows that stop early are padded while the others run on.
    stop_char = free[0].text[4]
    stop_id = lm.tokenizer.convert_tokens_to_ids(stop_char)
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, stop_id]
    stopped = generate_answers(lm, PROMPTS, GREEDY, batch_size=len(PROMPTS))
    for before, after in zip(free, stopped, strict=True):
        cut = before.text.find(stop_char)
        if cut == -1:
            assert after == before
        else:
            assert after.text == before.text[:cut].strip()
            assert after.completion_tokens == cut + 1  # the stop token counts, padding after it does not
    assert stopped[0].completion_tokens == free[0].text.find(stop_char) + 1 <= 5
    assert any(a.completion_tokens == GREEDY.max_new_tokens for a in stopped)


def test_sampling_repeats_with_its_seed_and_varies_across_seeds() -> None:
    lm = load_model("tiny-llama")
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11)
    first = generate_answers(lm, PROMPTS, params, batch_size=4)
    assert first == generate_answers(lm, PROMPTS, params, batch_size=4)
    other_seed = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=12)
    assert first != generate_answers(lm, PROMPTS, other_seed, batch_size=4)
    assert first != generate_answers(lm, PROMPTS, GenerationParams(max_new_tokens=8), batch_size=4)


def test_prompts_longer_than_the_context_keep_their_end() -> None:
    lm = load_model("tiny-gpt2")
    context = max_positions(lm)
    assert context is not None
    [answer] = generate_answers(lm, [("huge", "word " * 200)], GREEDY)
    assert answer.prompt_tokens == context - GREEDY.max_new_tokens
    assert answer.completion_tokens == GREEDY.max_new_tokens


def test_no_prompts_no_answers_and_wire_conversion() -> None:
    lm = load_model("tiny-gpt2")
    assert generate_answers(lm, [], GREEDY) == []
    answer = GeneratedAnswer("p1", "text", prompt_tokens=3, completion_tokens=2)
    assert answer.to_answer() == Answer(prompt_id="p1", text="text", prompt_tokens=3, completion_tokens=2)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_each_answer_carries_the_mean_log_probability_of_its_tokens(spec: str) -> None:
    lm = load_model(spec)
    answers = generate_answers(lm, PROMPTS, GREEDY, batch_size=2)  # left padding within a batch
    for (_, prompt), answer in zip(PROMPTS, answers, strict=True):
        # Teacher-force the prompt and the generated tokens, unpadded, one answer at a time.
        prompt_ids = prompt_token_ids(lm, prompt)
        generated = generate_answers(lm, [("x", prompt)], GREEDY, batch_size=1)[0]
        assert generated.completion_tokens == answer.completion_tokens
        tokens = _generated_tokens(lm, prompt_ids, answer.completion_tokens)
        ids = torch.tensor([prompt_ids + tokens])
        with torch.no_grad():
            log_probs = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), dim=-1)
        expected = sum(
            float(log_probs[len(prompt_ids) + t - 1, token]) for t, token in enumerate(tokens)
        ) / len(tokens)
        assert answer.logprob == pytest.approx(expected, abs=1e-4)
        assert answer.logprob is not None and answer.logprob <= 0.0
        assert answer.to_answer().logprob == pytest.approx(answer.logprob)


def _generated_tokens(lm: object, prompt_ids: list[int], count: int) -> list[int]:
    """The greedy continuation, token by token, without generate(): what the answer's tokens were."""
    ids = list(prompt_ids)
    for _ in range(count):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]  # type: ignore[attr-defined]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def test_an_answer_without_a_log_probability_encodes_as_before_and_a_bad_one_is_refused() -> None:
    import msgspec

    plain = Answer(prompt_id="p1", text="Four.", prompt_tokens=9, completion_tokens=2)
    assert b"logprob" not in msgspec.msgpack.encode(plain)
    for bad in (float("nan"), float("inf"), 0.5, -1e5):
        with pytest.raises(msgspec.ValidationError, match="logprob"):
            msgspec.msgpack.decode(
                msgspec.msgpack.encode({"prompt_id": "p1", "text": "x", "logprob": bad}), type=Answer
            )
