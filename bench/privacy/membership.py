"""Membership inference by loss: a model fits the examples it trained on better than others like them.

The attack calls an example a member when its loss is low; its ROC AUC over a member's private training
examples against held-out examples of the same distribution is the chance that a random training example
scores a lower loss than a random held-out one (0.5: the model tells nothing; FedCT reports it as VUL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def loss_attack_auc(member_losses: Sequence[float], held_out_losses: Sequence[float]) -> float:
    """P(member loss < held-out loss), ties counted half (the Mann-Whitney statistic over both sizes)."""
    members = np.asarray(member_losses, dtype=np.float64)
    held_out = np.asarray(held_out_losses, dtype=np.float64)
    if members.size == 0 or held_out.size == 0:
        raise ValueError("the attack needs at least one member and one held-out example")
    lower = (members[:, None] < held_out[None, :]).sum()
    ties = (members[:, None] == held_out[None, :]).sum()
    return float((lower + 0.5 * ties) / (members.size * held_out.size))
