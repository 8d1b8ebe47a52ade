"""The task `chorus-run` generates: a federated benchmark from text none of us wrote, Python docstrings.

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

Modules: `harvest` (docstrings into examples), `split` (families into private, public and test
sets), `files` (the JSONL files and summaries a task leaves behind), `cli` (`chorus-run data`).
"""

from __future__ import annotations

from schemas.errors import ChorusError


class TaskError(ChorusError):
    """A task cannot be built as configured; the message says what to change."""
