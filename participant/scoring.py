"""How likely a model finds the reference answers: per-example negative log-likelihood, teacher forced.

Each example is encoded exactly as for training (`training.encode_example`: the same prompt template,
the same end-of-turn, the same cut to `max_length`), so the score measures what training optimises.
One forward pass per batch and no generation, which makes it cheap enough to run after every round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from participant.data import Example
from participant.models import LocalModel, ModelError
from participant.training import build_batch, encode_example, padding_token_id, per_example_loss


@torch.inference_mode()
def response_nll(
    lm: LocalModel, examples: Sequence[Example], max_length: int = 256, batch_size: int = 16
) -> list[float]:
    """Mean negative log-likelihood (nats) per response token of each example, in the input order.

    Examples are batched by length so that little compute goes to padding; example weights are ignored.
    """
    if not examples:
        raise ModelError("response_nll needs at least one example")
    if batch_size < 1:
        raise ModelError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [encode_example(lm, example, max_length) for example in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    scores = [0.0] * len(encoded)
    was_training = lm.model.training
    lm.model.eval()  # no dropout: the same model gives the same score
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = build_batch([encoded[i] for i in chunk], padding_token_id(lm)).to(lm.device)
            losses, _counts = per_example_loss(lm, batch)
            for index, loss in zip(chunk, losses.tolist(), strict=True):
                scores[index] = float(loss)
    finally:
        lm.model.train(was_training)
    return scores
