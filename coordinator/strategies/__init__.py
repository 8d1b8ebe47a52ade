"""Round strategies, by the name a settings file gives (`strategy = "..."`).

A new strategy is one module with a `build(context) -> RoundStrategy` function and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.embedding import Embedder
from coordinator.prompts import PublicPrompt
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore
from coordinator.strategies import fedavg, semantic
from coordinator.strategies.base import Outgoing, RoundStrategy, StrategyContext

__all__ = ["STRATEGIES", "Outgoing", "RoundStrategy", "StrategyContext", "build_round_strategy"]

STRATEGIES: dict[str, Callable[[StrategyContext], RoundStrategy]] = {
    "semantic": semantic.build,
    "fedavg": fedavg.build,
}


def build_round_strategy(
    settings: CoordinatorSettings,
    store: CoordinatorStore,
    prompts: Sequence[PublicPrompt],
    embedder: Embedder | None = None,
) -> RoundStrategy:
    """The strategy the settings name, over this store and prompt set (`embedder`: None for the one
    the settings name)."""
    build = STRATEGIES.get(settings.strategy)
    if build is None:
        raise ValueError(f"unknown strategy {settings.strategy!r}; known: {sorted(STRATEGIES)}")
    return build(StrategyContext(settings, store, prompts, embedder))
