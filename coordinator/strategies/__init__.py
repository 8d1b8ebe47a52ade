"""Round strategies, by the name a settings file gives (`strategy = "..."`).

A new strategy is one module with a `build(context) -> RoundStrategy` function and one line here.
The name is checked here, where the strategy is built, so that loading a settings file imports no
strategy (nor what they import: consensus, hnswlib, numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.embedding import Embedder
from coordinator.prompts import PublicPrompt
from coordinator.settings import CoordinatorSettings, SettingsError
from coordinator.store import CoordinatorStore
from coordinator.strategies import fedavg, majority, semantic
from coordinator.strategies.base import Decision, Outgoing, RoundStrategy, StrategyContext

__all__ = [
    "STRATEGIES",
    "Decision",
    "Outgoing",
    "RoundStrategy",
    "StrategyContext",
    "build_round_strategy",
    "check_strategy_name",
]

STRATEGIES: dict[str, Callable[[StrategyContext], RoundStrategy]] = {
    "semantic": semantic.build,
    "fedavg": fedavg.build,
    "majority": majority.build,
}


def check_strategy_name(name: str) -> Callable[[StrategyContext], RoundStrategy]:
    """The builder registered as `name`, or a SettingsError that lists the known names."""
    build = STRATEGIES.get(name)
    if build is None:
        raise SettingsError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    return build


def build_round_strategy(
    settings: CoordinatorSettings,
    store: CoordinatorStore,
    prompts: Sequence[PublicPrompt],
    embedder: Embedder | None = None,
) -> RoundStrategy:
    """The strategy the settings name, over this store and prompt set (`embedder`: None for the one
    the settings name); a SettingsError for a name no strategy is registered under."""
    return check_strategy_name(settings.strategy)(StrategyContext(settings, store, prompts, embedder))
