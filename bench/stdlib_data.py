"""A federated benchmark task built from text none of us wrote: Python docstrings.

Each documented public callable of a module becomes one example:

- prompt: "In one sentence, what does the Python function `textwrap.dedent(text)` do?"
- reference: the first sentence of its docstring.

Modules are grouped into *families* (text, data, math, ...). Private data is split
non-IID by family: under ``split="family"`` every participant has home families and
gets most of their examples; under ``split="dirichlet"`` each family is spread over
participants by Dirichlet(alpha) proportions. Public prompts are callables in no
private set. Two held-out test sets exist:

- ``test.jsonl`` (global): drawn from every family before anything else. **The
  benchmark score is measured on this set**: it is the same for everyone and covers
  the families a participant never saw privately, which is what federation should help.
- ``participants/<pid>/test.jsonl`` (local): a slice of the participant's own private
  examples, for personalisation (did federation hurt a participant's home families?).

Everything is deterministic for a given interpreter: members are sorted and every
random choice comes from a generator seeded by ``seed`` and the family (or participant)
it concerns. The callables and their docstrings depend on the Python version, which
``task.json`` records.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

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

PROMPT_TEMPLATE = "In one sentence, what does the Python {kind} `{call}` do?"
MIN_WORDS = 4
MAX_WORDS = 40
MAX_SIGNATURE_CHARS = 200
SCORE_SET = "test.jsonl"

Split = Literal["family", "dirichlet"]
Kind = Literal["function", "class", "method"]

# A first docstring line like "strftime(format[, tuple]) -> string" is a signature, not prose.
_SIGNATURE_START = re.compile(r"^([\w.]+\s*=\s*)?[\w.]+\(")  # also "csv_reader = reader(...)"
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(?:-+>\s*(?P<result>.*))?$")
MAX_RESULT_WORDS = 3  # "-> floating point number" is a type; "-> the logarithm of z ..." is prose
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.")
# Default values whose repr holds a memory address would make prompts differ between runs.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class TaskError(ValueError):
    """A task cannot be built as configured; the message says what to change."""


@dataclass(frozen=True)
class Example:
    prompt_id: str  # "module.name" or "module.Class.method": stable across runs
    module: str
    family: str
    kind: Kind
    prompt: str
    reference: str


@dataclass(frozen=True)
class Harvest:
    examples: list[Example]
    skipped: Counter[str]
    per_module: dict[str, int]


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


# ---- harvesting docstrings ---------------------------------------------------


def first_sentence(doc: str | None, is_class: bool = False) -> tuple[str | None, str]:
    """The first sentence of a docstring's first prose paragraph, or None and why it is unusable.

    Old-style C docstrings open with a signature line ("strftime(format[, tuple]) -> string");
    CPython strips such lines from converted builtins, so we strip them too and read the
    prose after. A docstring that is only a signature is skipped, and so is a class whose
    docstring opens with a bare constructor signature: the text after it describes the
    arguments ("All arguments are optional."), not the class.
    """
    if not doc or not doc.strip():
        return None, "no_docstring"
    cleaned = inspect.cleandoc(doc)
    text = _without_signature_lines(cleaned, is_class).strip()
    if not text or (text != cleaned and text[0].islower()):
        return None, "signature_line"  # nothing after the signature, or its mid-sentence tail
    paragraph = " ".join(text.split("\n\n", 1)[0].split()).replace("``", "`")
    sentence = _cut_first_sentence(paragraph)
    if "->" in sentence:  # "int, int, int -> Construct a date ...": a signature in prose clothing
        return None, "signature_line"
    if sentence.endswith(":"):
        return None, "incomplete"  # "Return one of the following:" needs the list after it
    words = len(sentence.split())
    if words < MIN_WORDS:
        return None, "too_short"
    if words > MAX_WORDS:
        return None, "too_long"
    return sentence, "ok"


def _without_signature_lines(text: str, is_class: bool) -> str:
    """The docstring minus an opening "name(args) -> type" line; "" when that line is
    not a bare signature (it carries the description itself, or wraps over lines)."""
    first, _, rest = text.partition("\n")
    if not _SIGNATURE_START.match(first):
        return text
    signature = _SIGNATURE_LINE.match(first.strip())
    result_words = len((signature.group("result") or "").split()) if signature else 0
    if signature is None or result_words > MAX_RESULT_WORDS or (is_class and not result_words):
        return ""
    return rest


def _cut_first_sentence(paragraph: str) -> str:
    for match in _SENTENCE_END.finditer(paragraph):
        candidate = paragraph[: match.end()]
        if not candidate.endswith(_ABBREVIATIONS):
            return candidate
    return paragraph


def describe_call(qualified_name: str, obj: Any, drop_first: bool) -> str:
    """`qualified_name(signature)`; builtins without a signature get `(...)`."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{qualified_name}(...)"
    parameters = list(signature.parameters.values())
    if drop_first and parameters and parameters[0].name in ("self", "cls"):
        signature = signature.replace(parameters=parameters[1:])
    text = _ADDRESS.sub("", str(signature.replace(return_annotation=inspect.Signature.empty)))
    if len(text) > MAX_SIGNATURE_CHARS:
        text = "(...)"
    return f"{qualified_name}{text}"


def import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as e:  # any import-time failure, not only ImportError, means "cannot use it"
        raise TaskError(
            f"cannot import module {name!r} ({type(e).__name__}: {e}); "
            "fix the name, install the package, or leave it out of --modules"
        ) from e


def public_members(module: ModuleType) -> list[tuple[str, Any]]:
    """Public callables the module itself offers: its `__all__`, else what it defines."""
    exported = getattr(module, "__all__", None)
    if exported is None:
        exported = [name for name, obj in vars(module).items() if _defined_in(obj, module)]
    members = []
    for name in sorted(set(exported)):
        obj = getattr(module, name, None)
        if not name.startswith("_") and (inspect.isroutine(obj) or inspect.isclass(obj)):
            members.append((name, obj))
    return members


def _defined_in(obj: Any, module: ModuleType) -> bool:
    # C accelerators report their own name: `_heapq` for heapq, `_functools` for functools.
    short = module.__name__.rsplit(".", 1)[-1]
    return getattr(obj, "__module__", None) in (module.__name__, f"_{short}")


def own_methods(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, raw attribute, attribute as looked up on the class) for methods the class defines."""
    methods = []
    for name, raw in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        function = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
        if inspect.isroutine(function):
            methods.append((name, function, getattr(cls, name)))
    return methods


def harvest_module(module_name: str, family: str, include_methods: bool = True) -> Harvest:
    module = import_module(module_name)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()

    def consider(qualified: str, kind: Kind, doc: str | None, obj: Any, drop_first: bool) -> None:
        reference, reason = first_sentence(doc, is_class=kind == "class")
        if reference is None:
            skipped[reason] += 1
            return
        prompt = PROMPT_TEMPLATE.format(kind=kind, call=describe_call(qualified, obj, drop_first))
        examples.append(Example(qualified, module_name, family, kind, prompt, reference))

    for name, obj in public_members(module):
        qualified = f"{module_name}.{name}"
        is_class = inspect.isclass(obj)
        # Use the raw __doc__: inspect.getdoc would borrow a parent's docstring.
        consider(qualified, "class" if is_class else "function", obj.__doc__, obj, drop_first=False)
        if is_class and include_methods:
            for method_name, function, looked_up in own_methods(obj):
                consider(f"{qualified}.{method_name}", "method", function.__doc__, looked_up, True)
    return Harvest(examples, skipped, {module_name: len(examples)})


def harvest(family_of: Mapping[str, str], include_methods: bool = True) -> Harvest:
    """Examples from every module, sorted by prompt id, one per distinct reference sentence."""
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    per_module: dict[str, int] = {}
    for module_name in sorted(family_of):
        part = harvest_module(module_name, family_of[module_name], include_methods)
        examples += part.examples
        skipped += part.skipped
        per_module.update(part.per_module)
    # Among callables sharing a docstring, keep the shallowest: `random.randint`, not
    # `random.Random.randint`.
    by_depth = sorted(examples, key=lambda e: (e.prompt_id.count("."), e.prompt_id))
    unique = _drop_duplicate_references(by_depth, skipped, per_module)
    return Harvest(_sorted(unique), skipped, per_module)


def _drop_duplicate_references(
    examples: list[Example], skipped: Counter[str], per_module: dict[str, int]
) -> list[Example]:
    # Two callables with one docstring would put the same answer in the public set and in
    # a test set: keep the first of them.
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.reference in seen:
            skipped["duplicate_reference"] += 1
            per_module[example.module] -= 1
            continue
        seen.add(example.reference)
        unique.append(example)
    return unique


# ---- splitting ----------------------------------------------------------------


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
    return Task(config, train, local_test, homes, _sorted(public), _sorted(test), harvested)


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
    return {family: _sorted(groups[family]) for family in sorted(groups)}


def _sorted(examples: Iterable[Example]) -> list[Example]:
    return sorted(examples, key=lambda e: e.prompt_id)


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
    for family, count in Counter(e.family for e in _sorted(examples)).most_common():
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
        shuffled = _sorted(examples)
        random.Random(f"{config.seed}:{pid}:local").shuffle(shuffled)
        n_test = round(len(shuffled) * config.test_fraction)
        local_test[pid] = _sorted(shuffled[:n_test])
        train[pid] = _sorted(shuffled[n_test:])
    return train, local_test


# ---- writing --------------------------------------------------------------------


def write_task(task: Task, out_dir: str | Path) -> Path:
    """Write the task as JSONL files plus `task.json`; returns the `task.json` path."""
    root = Path(out_dir)
    for pid in task.participants:
        folder = root / "participants" / pid
        folder.mkdir(parents=True, exist_ok=True)
        _write_jsonl(folder / "train.jsonl", task.train[pid], _qa_line)
        _write_jsonl(folder / "test.jsonl", task.local_test[pid], _qa_line)
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "public_prompts.jsonl", task.public, _public_prompt_line)
    # Evaluator-only: lets a run score pseudo-labels against the docstrings. Never sent to anyone.
    _write_jsonl(root / "public_references.jsonl", task.public, _public_reference_line)
    _write_jsonl(root / SCORE_SET, task.test, _qa_line)
    summary_path = root / "task.json"
    summary_path.write_text(json.dumps(task_summary(task), indent=2, ensure_ascii=False) + "\n")
    return summary_path


def _qa_line(example: Example) -> dict[str, str]:
    return {"prompt": example.prompt, "response": example.reference}


def _public_prompt_line(example: Example) -> dict[str, str]:
    return {"prompt_id": example.prompt_id, "prompt": example.prompt}


def _public_reference_line(example: Example) -> dict[str, str]:
    return {"prompt_id": example.prompt_id, "family": example.family, "response": example.reference}


def _write_jsonl(path: Path, examples: list[Example], line: Callable[[Example], dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for example in examples:
            out.write(json.dumps(line(example), ensure_ascii=False) + "\n")


def task_summary(task: Task) -> dict[str, Any]:
    config = task.config
    return {
        "benchmark": "stdlib-docstrings",
        "python_version": task.python_version,
        "python_implementation": platform.python_implementation(),
        "platform": sys.platform,
        "score_on": f"{SCORE_SET} (global test set, stratified over every family)",
        "config": {
            "modules": list(config.modules),
            "family_of": config.family_of,
            "n_participants": config.n_participants,
            "seed": config.seed,
            "public_fraction": config.public_fraction,
            "test_fraction": config.test_fraction,
            "split": config.split,
            "alpha": config.alpha,
            "home_share": config.home_share,
            "prompt_template": PROMPT_TEMPLATE,
            "reference_words": [MIN_WORDS, MAX_WORDS],
        },
        "counts": {
            "usable": len(task.harvest.examples),
            "public": len(task.public),
            "test": len(task.test),
            "train": sum(len(v) for v in task.train.values()),
            "local_test": sum(len(v) for v in task.local_test.values()),
            "per_family": _family_counts(task),
            "per_module": task.harvest.per_module,
            "per_participant": {pid: _participant_counts(task, pid) for pid in task.participants},
        },
        "skipped": dict(sorted(task.harvest.skipped.items())),
    }


def _family_counts(task: Task) -> dict[str, dict[str, int]]:
    sets = {
        "usable": task.harvest.examples,
        "public": task.public,
        "test": task.test,
        "train": [e for pid in task.participants for e in task.train[pid]],
        "local_test": [e for pid in task.participants for e in task.local_test[pid]],
    }
    counters = {name: Counter(e.family for e in examples) for name, examples in sets.items()}
    families = sorted(counters["usable"])
    return {family: {name: counters[name][family] for name in sets} for family in families}


def _participant_counts(task: Task, pid: str) -> dict[str, Any]:
    train = task.train[pid]
    homes = task.home_families[pid]
    return {
        "train": len(train),
        "test": len(task.local_test[pid]),
        "home_families": homes,
        "home_share_of_train": round(home_fraction(train, homes), 3),
        "train_by_family": dict(sorted(Counter(e.family for e in train).items())),
    }


def home_fraction(examples: list[Example], home_families: list[str]) -> float:
    if not examples:
        return 0.0
    return sum(e.family in home_families for e in examples) / len(examples)


# ---- CLI ----------------------------------------------------------------------------


def format_summary(task: Task) -> str:
    lines = [
        f"stdlib docstring task: Python {task.python_version}, {len(task.harvest.examples)} usable "
        f"callables, split={task.config.split}, seed={task.config.seed}",
        "",
        f"{'family':<12} {'usable':>6} {'public':>6} {'test':>5} {'train':>6} {'l.test':>6}",
    ]
    for family, counts in _family_counts(task).items():
        lines.append(
            f"{family:<12} {counts['usable']:>6} {counts['public']:>6} {counts['test']:>5} "
            f"{counts['train']:>6} {counts['local_test']:>6}"
        )
    lines += ["", f"{'participant':<12} {'train':>6} {'test':>5} {'home%':>6}  home families"]
    for pid in task.participants:
        mine = _participant_counts(task, pid)
        lines.append(
            f"{pid:<12} {mine['train']:>6} {mine['test']:>5} {mine['home_share_of_train']:>6.0%}  "
            f"{', '.join(mine['home_families']) or '-'}"
        )
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(task.harvest.skipped.items()))
    lines += ["", f"skipped: {skipped}", f"benchmark score: {SCORE_SET} ({len(task.test)} examples)"]
    return "\n".join(lines)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--modules", help="comma-separated modules, each optionally 'module:family'")
    parser.add_argument("--split", choices=["family", "dirichlet"], default="family")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--public-fraction", type=float, default=0.3)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--home-share", type=float, default=0.8)
    args = parser.parse_args(argv)
    modules, families = parse_modules(args.modules) if args.modules else (None, None)
    try:
        task = build_task(
            modules, families, args.participants, args.seed, args.public_fraction,
            args.test_fraction, args.split, args.alpha, args.home_share,
        )  # fmt: skip
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_task(task, args.out)
    print(format_summary(task))
    print(f"\nwrote {path.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
