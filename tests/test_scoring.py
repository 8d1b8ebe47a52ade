"""participant/scoring.py: the batched NLL of reference answers against a hand-computed cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch

from participant.data import Example
from participant.models import ModelError, load_model
from participant.scoring import response_nll
from participant.training import encode_example

EXAMPLES = [
    Example("What is 2 plus one?", "It is 3."),
    Example("Say something much longer than the other prompts, please.", "Here is a long reply to it."),
    Example("Hi?", "Hello there, friend."),
]


def hand_nll(lm: object, example: Example, max_length: int) -> float:
    """One unpadded sequence: -log p(token t+1 | tokens <= t) averaged over the response tokens."""
    encoded = encode_example(lm, example, max_length)  # type: ignore[arg-type]
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].double()  # type: ignore[attr-defined]
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = range(encoded.prompt_length, len(encoded.input_ids))
    total = -sum(float(log_probs[t - 1, encoded.input_ids[t]]) for t in targets)
    return total / len(targets)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_batched_nll_matches_the_hand_computed_cross_entropy(spec: str) -> None:
    lm = load_model(spec)
    scores = response_nll(lm, EXAMPLES, max_length=64, batch_size=2)  # padding within a batch
    expected = [hand_nll(lm, example, 64) for example in EXAMPLES]
    assert scores == pytest.approx(expected, rel=1e-4)
    # A random model over a vocabulary of V tokens scores about log V per token; far from 0.
    assert all(0.5 < s < 2 * math.log(lm.model.config.vocab_size) for s in scores)


def test_order_batching_and_mode_do_not_change_the_scores() -> None:
    lm = load_model("tiny-llama")
    lm.model.train()  # dropout would make scores random; the scorer evaluates without it
    one_by_one = [response_nll(lm, [example], max_length=64)[0] for example in EXAMPLES]
    batched = response_nll(lm, EXAMPLES[::-1], max_length=64, batch_size=8)[::-1]
    assert batched == pytest.approx(one_by_one, rel=1e-5)
    assert lm.model.training  # the model's mode is restored


def test_no_examples_is_an_error() -> None:
    with pytest.raises(ModelError, match="at least one example"):
        response_nll(load_model("tiny-llama"), [])
