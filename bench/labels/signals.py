"""What a member can compute locally about answers and prompts: teacher-forced token statistics of an
answer under its model, and its affinity to a prompt (closeness to its private prompts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from participant.data import Example
from participant.models import LocalModel
from participant.training import IGNORE_INDEX, build_batch, encode_example, padding_token_id


@dataclass(frozen=True)
class TokenStats:
    """Of one answer under one model, over its response tokens (the end of turn included)."""

    logprob: float  # mean log-probability of the answer's tokens (teacher forced)
    self_certainty: float  # mean KL(uniform || next-token distribution), arXiv 2502.18581


@torch.inference_mode()
def token_stats(
    lm: LocalModel, examples: Sequence[Example], max_length: int, batch_size: int = 16
) -> list[TokenStats]:
    """Per example (prompt, answer), its `TokenStats` under `lm`, encoded exactly as training encodes it.

    KL(U || p) = -log V - (1/V) sum_v log p_v: how far the model's distribution is from knowing nothing,
    whatever token it then wrote; higher is surer.
    """
    encoded = [encode_example(lm, example, max_length) for example in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    stats: list[TokenStats | None] = [None] * len(encoded)
    was_training = lm.model.training
    lm.model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = build_batch([encoded[i] for i in chunk], padding_token_id(lm)).to(lm.device)
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts t + 1
            mask = targets != IGNORE_INDEX
            logp = torch.log_softmax(logits, dim=-1)
            chosen = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            certainty = -math.log(logp.shape[-1]) - logp.mean(dim=-1)
            counts = mask.sum(dim=1).clamp(min=1)
            mean_logprob = (chosen * mask).sum(dim=1) / counts
            mean_certainty = (certainty * mask).sum(dim=1) / counts
            for index, lp, sc in zip(chunk, mean_logprob.tolist(), mean_certainty.tolist(), strict=True):
                stats[index] = TokenStats(float(lp), float(sc))
    finally:
        lm.model.train(was_training)
    return [s for s in stats if s is not None]


def affinity(
    prompts: npt.NDArray[np.float64], private: npt.NDArray[np.float64], top_k: int = 5
) -> list[float]:
    """Per prompt (unit rows), the mean of its `top_k` cosine similarities to a member's private prompts."""
    similarities = prompts @ private.T
    k = min(top_k, similarities.shape[1])
    nearest = -np.sort(-similarities, axis=1)[:, :k]
    return [float(row.mean()) for row in nearest]
