"""Harvesting docstrings: each documented public callable of a module becomes one example."""

from __future__ import annotations

import importlib
import inspect
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from federation.stdlib_task import TaskError

PROMPT_TEMPLATE = "In one sentence, what does the Python {kind} `{call}` do?"
MIN_WORDS = 4
MAX_WORDS = 40
MAX_SIGNATURE_CHARS = 200

Kind = Literal["function", "class", "method"]

# A first docstring line like "strftime(format[, tuple]) -> string" is a signature, not prose.
_SIGNATURE_START = re.compile(r"^([\w.]+\s*=\s*)?[\w.]+\(")  # also "csv_reader = reader(...)"
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(?:-+>\s*(?P<result>.*))?$")
MAX_RESULT_WORDS = 3  # "-> floating point number" is a type; "-> the logarithm of z ..." is prose
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "resp.")
# Default values whose repr holds a memory address would make prompts differ between runs.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
    return Harvest(sorted_by_id(unique), skipped, per_module)


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


def sorted_by_id(examples: Iterable[Example]) -> list[Example]:
    return sorted(examples, key=lambda e: e.prompt_id)
