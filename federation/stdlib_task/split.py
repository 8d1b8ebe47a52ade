"""Splitting a harvest into private, public and test sets, non-IID by family."""

from __future__ import annotations

import platform
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from federation.stdlib_task import TaskError
from federation.stdlib_task.harvest import Example, Harvest, harvest, sorted_by_id

DEFAULT_FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "textwrap", "re", "difflib", "unicodedata"),
    "data": ("json", "csv", "base64", "binascii", "struct"),
    "math": ("math", "cmath", "statistics", "fractions", "decimal", "random"),
    "fs": ("os.path", "pathlib", "shutil", "glob", "fnmatch"),
    "time": ("datetime", "time", "calendar"),
    "functional": ("itertools", "functools", "operator"),
    "containers": ("collections", "heapq", "bisect", "copy"),
    "net": ("urllib.parse", "ipaddress", "email.utils", "html"),
}

Split = Literal["family", "dirichlet"]


@dataclass(frozen=True)
class TaskConfig:
    modules: tuple[str, ...]
    family_of: dict[str, str]  # module -> family
    n_participants: int
    seed: int
    public_fraction: float
    test_fraction: float
    split: Split
    alpha: float
    home_share: float


@dataclass(frozen=True)
class Task:
    config: TaskConfig
    train: dict[str, list[Example]]
    local_test: dict[str, list[Example]]
    home_families: dict[str, list[str]]
    public: list[Example]
    test: list[Example]
    harvest: Harvest
    python_version: str = field(default_factory=platform.python_version)

    @property
    def participants(self) -> list[str]:
        return sorted(self.train)


def resolve_families(
    modules: Sequence[str] | None, families: Mapping[str, Sequence[str]] | None
) -> dict[str, str]:
    """module -> family. `families` (family -> modules) wins over DEFAULT_FAMILIES; a module
    in neither joins the family named by its top-level package. Without `modules`, every
    module of `families` (or of DEFAULT_FAMILIES) is used."""
    explicit = _invert(families or {})
    chosen = list(modules) if modules is not None else list(explicit or _invert(DEFAULT_FAMILIES))
    if not chosen:
        raise TaskError("no modules given; pass at least one module name")
    known = _invert(DEFAULT_FAMILIES) | explicit
    return {module: known.get(module, module.split(".")[0]) for module in chosen}


def default_families(names: Sequence[str]) -> dict[str, list[str]]:
    """family -> modules for the DEFAULT_FAMILIES called `names`; an unknown name is a TaskError."""
    unknown = sorted(set(names) - set(DEFAULT_FAMILIES))
    if unknown:
        raise TaskError(f"unknown families {unknown}; choose from {sorted(DEFAULT_FAMILIES)}")
    return {name: list(DEFAULT_FAMILIES[name]) for name in names}


def _invert(families: Mapping[str, Sequence[str]]) -> dict[str, str]:
    return {module: family for family, members in families.items() for module in members}


def build_task(
    modules: Sequence[str] | None = None,
    families: Mapping[str, Sequence[str]] | None = None,
    n_participants: int = 4,
    seed: int = 0,
    public_fraction: float = 0.3,
    test_fraction: float = 0.15,
    split: Split = "family",
    alpha: float = 0.5,
    home_share: float = 0.8,
    include_methods: bool = True,
) -> Task:
    """Harvest the modules and split the examples into private, public and test sets.

    `modules` defaults to every module of `families` (family -> modules, default
    DEFAULT_FAMILIES). `test_fraction` of each family becomes the global test set and
    `public_fraction` the public prompts; the rest is private. Each participant then
    keeps `test_fraction` of its private examples as its local test set. Under the
    family split a participant gets `home_share` of its home families' private examples.
    """
    family_of = resolve_families(modules, families)
    config = TaskConfig(
        tuple(family_of), family_of, n_participants, seed, public_fraction, test_fraction,
        split, alpha, home_share,
    )  # fmt: skip
    _validate(config)
    harvested = harvest(family_of, include_methods)
    if not harvested.examples:
        raise TaskError(f"no usable documented callables in {sorted(family_of)}")
    by_family = _group_by_family(harvested.examples)
    test, public, private = _carve_shared_sets(by_family, config)
    participants = [f"p{i:02d}" for i in range(n_participants)]
    if split == "family":
        assigned, homes = _split_by_home_family(private, participants, config)
    else:
        assigned, homes = _split_by_dirichlet(private, participants, config)
    train, local_test = _carve_local_tests(assigned, config)
    return Task(config, train, local_test, homes, sorted_by_id(public), sorted_by_id(test), harvested)


def _validate(config: TaskConfig) -> None:
    if config.n_participants < 1:
        raise TaskError(f"n_participants must be at least 1, got {config.n_participants}")
    for name in ("public_fraction", "test_fraction"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise TaskError(f"{name} must be in [0, 1), got {value}")
    if config.public_fraction + config.test_fraction >= 1.0:
        raise TaskError("public_fraction + test_fraction must leave something private (sum < 1)")
    if config.split not in ("family", "dirichlet"):
        raise TaskError(f"split must be 'family' or 'dirichlet', got {config.split!r}")
    if config.alpha <= 0:
        raise TaskError(f"alpha must be positive, got {config.alpha}")
    if not 0.0 <= config.home_share <= 1.0:
        raise TaskError(f"home_share must be in [0, 1], got {config.home_share}")


def _family_rng(config: TaskConfig, family: str, purpose: str) -> random.Random:
    # One generator per (seed, family, purpose): adding a module to one family
    # leaves every other family's split unchanged. String seeds hash deterministically.
    return random.Random(f"{config.seed}:{family}:{purpose}")


def _group_by_family(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.family, []).append(example)
    return {family: sorted_by_id(groups[family]) for family in sorted(groups)}


def _carve_shared_sets(
    by_family: dict[str, list[Example]], config: TaskConfig
) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """Global test and public prompts, stratified by family; the rest stays private."""
    test: list[Example] = []
    public: list[Example] = []
    private: dict[str, list[Example]] = {}
    for family, examples in by_family.items():
        shuffled = list(examples)
        _family_rng(config, family, "shared").shuffle(shuffled)
        n_test = round(len(shuffled) * config.test_fraction)
        n_public = round(len(shuffled) * config.public_fraction)
        test += shuffled[:n_test]
        public += shuffled[n_test : n_test + n_public]
        private[family] = shuffled[n_test + n_public :]
    return test, public, private


def _home_participants(
    private: dict[str, list[Example]], participants: list[str], seed: int
) -> dict[str, list[str]]:
    """Deal families to participants in a seeded order. With more participants than
    families, each extra participant joins the family with the most examples per home."""
    order = sorted(private)
    random.Random(f"{seed}:homes").shuffle(order)
    homes: dict[str, list[str]] = {family: [] for family in order}
    for k, pid in enumerate(participants):
        if k < len(order):
            homes[order[k]].append(pid)
        else:
            roomiest = max(order, key=lambda f: len(private[f]) / (len(homes[f]) + 1))
            homes[roomiest].append(pid)
    for k in range(len(participants), len(order)):  # fewer participants: deal the rest round-robin
        homes[order[k]].append(participants[k % len(participants)])
    return homes


def _split_by_home_family(
    private: dict[str, list[Example]], participants: list[str], config: TaskConfig
) -> tuple[dict[str, list[Example]], dict[str, list[str]]]:
    homes = _home_participants(private, participants, config.seed)
    assigned: dict[str, list[Example]] = {pid: [] for pid in participants}
    for family, examples in private.items():
        guests = [pid for pid in participants if pid not in homes[family]]
        n_home = len(examples) if not guests else round(len(examples) * config.home_share)
        _deal(examples[:n_home], homes[family], assigned)
        _deal(examples[n_home:], guests, assigned)
    return assigned, _families_per_participant(homes, participants)


def _deal(examples: list[Example], receivers: list[str], assigned: dict[str, list[Example]]) -> None:
    for i, example in enumerate(examples):
        assigned[receivers[i % len(receivers)]].append(example)


def _split_by_dirichlet(
    private: dict[str, list[Example]], participants: list[str], config: TaskConfig
) -> tuple[dict[str, list[Example]], dict[str, list[str]]]:
    """Each family spread over participants by Dirichlet(alpha) proportions. A participant's
    home families are its most frequent ones that together make at least half its data."""
    assigned: dict[str, list[Example]] = {pid: [] for pid in participants}
    for family, examples in private.items():
        rng = _family_rng(config, family, "dirichlet")
        weights = [rng.gammavariate(config.alpha, 1.0) for _ in participants]
        start = 0
        for pid, count in zip(participants, _apportion(len(examples), weights), strict=True):
            assigned[pid] += examples[start : start + count]
            start += count
    return assigned, {pid: _dominant_families(assigned[pid]) for pid in participants}


def _dominant_families(examples: list[Example]) -> list[str]:
    dominant: list[str] = []
    covered = 0
    for family, count in Counter(e.family for e in sorted_by_id(examples)).most_common():
        if covered * 2 >= len(examples):
            break
        dominant.append(family)
        covered += count
    return sorted(dominant)


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Integer counts summing to `total`, proportional to weights (largest remainder)."""
    if sum(weights) <= 0:  # every gamma draw underflowed: fall back to equal shares
        weights = [1.0] * len(weights)
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _families_per_participant(homes: dict[str, list[str]], participants: list[str]) -> dict[str, list[str]]:
    return {pid: sorted(f for f, owners in homes.items() if pid in owners) for pid in participants}


def _carve_local_tests(
    assigned: dict[str, list[Example]], config: TaskConfig
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    train: dict[str, list[Example]] = {}
    local_test: dict[str, list[Example]] = {}
    for pid, examples in assigned.items():
        shuffled = sorted_by_id(examples)
        random.Random(f"{config.seed}:{pid}:local").shuffle(shuffled)
        n_test = round(len(shuffled) * config.test_fraction)
        local_test[pid] = sorted_by_id(shuffled[:n_test])
        train[pid] = sorted_by_id(shuffled[n_test:])
    return train, local_test


def home_fraction(examples: list[Example], home_families: list[str]) -> float:
    if not examples:
        return 0.0
    return sum(e.family in home_families for e in examples) / len(examples)


def parse_modules(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """'json,csv,numpy.linalg:linalg' -> the modules, and the families named with ':'."""
    modules: list[str] = []
    families: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        module, _, family = item.partition(":")
        modules.append(module)
        if family:
            families.setdefault(family, []).append(module)
    return modules, families
