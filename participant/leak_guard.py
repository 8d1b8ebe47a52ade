"""The leak guard: before a participant publishes, withhold an answer that copies its private data.

A model fine-tuned on private examples can reproduce them in what it generates, and what it generates
goes to the coordinator and, as labels, to every member. The guard indexes the participant's own
examples once (training and test examples, prompts with responses unless `index_prompts` is off) as
hashes of their normalized word n-grams, and checks each answer's text before it is published:

- **span**: the answer shares `min_span_tokens` (default 8) consecutive normalized tokens with a
  private example;
- **precision** (off unless `max_precision` is set): the answer has at least `min_span_tokens` tokens
  and more than `max_precision` of its distinct `precision_ngram_tokens`-grams occur in one private
  example (copying with a word changed here and there).

An n-gram the answered prompt itself contains counts for neither: the coordinator sent that text.
A withheld answer goes out blank (`withhold_as = "blank"`, the default) or is left out of its batch
("omit"); either way its text, its token count and its log-probability stay home. The guard counts
what it withheld, and by which test; it never logs or reports the text.

Normalization: Unicode NFKC, case folding, invisible format characters (zero-width spaces, soft
hyphens) removed, then word tokens: runs of letters and digits (punctuation, underscores, markup and
whitespace only separate them), each Han or kana character a token of its own.

What it does not stop: paraphrase or translation; encodings (base64, hex, ROT13, spelling a word
letter by letter, spaces or other letters put inside words, look-alike letters of another script);
a secret shorter than `min_span_tokens` tokens with too little of its private context around it
(an access code alone); a record spread over several answers, each with a shorter span; a word
inserted every few tokens (the precision test, when on, catches some of these); and anything carried
outside answer texts (FedAvg adapters, the guard's own count, which prompts went out blank).

Pure: no model calls, no I/O; it needs neither torch nor a tokenizer, so it guards black boxes too.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from participant.data import Example
from participant.settings import LeakGuardTable
from schemas.messages import Answer

Reason = Literal["span", "precision"]

# Scripts written without spaces: each character is a token (a run of them would be one "word").
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+")
# Soft hyphen, zero-width spaces and joiners, direction marks, word joiner, invisible operators, BOM.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")


def tokens(text: str) -> list[str]:
    """`text` as normalized word tokens (see the module's docstring)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _TOKEN.findall(_INVISIBLE.sub("", folded))


def _ngrams(words: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)


def ngram_hashes(words: Sequence[str], n: int) -> set[int]:
    """The hashes of every run of `n` consecutive tokens in `words` (none when there are fewer)."""
    return set(map(hash, _ngrams(words, n)))


@dataclass
class Screened:
    """One round's answers after the guard: what to publish, and which prompts' answers it withheld."""

    answers: dict[str, Answer]  # prompt id -> the answer to publish; an omitted one is absent
    withheld: dict[str, Reason] = field(default_factory=dict)  # prompt id -> why

    def counts(self) -> dict[str, int]:
        """How many were withheld, in all and by test: numbers only, never a text."""
        reasons = Counter(self.withheld.values())
        return {"withheld": len(self.withheld), "span": reasons["span"], "precision": reasons["precision"]}


class LeakGuard:
    """An index of a participant's private examples, built once; `check` and `screen` answers."""

    def __init__(self, settings: LeakGuardTable, examples: Iterable[Example]) -> None:
        started = time.perf_counter()
        self.settings = settings
        self.examples = 0
        self._spans: set[int] = set()
        self._postings: dict[int, list[int]] = {}  # precision n-gram hash -> examples holding it
        if settings.enabled:
            for example in examples:
                self._add(example)
        self.build_seconds = time.perf_counter() - started

    def _add(self, example: Example) -> None:
        words = tokens(example.response)
        if self.settings.index_prompts:
            words = tokens(example.prompt) + words  # one stream: a span may run from prompt into response
        self._spans.update(ngram_hashes(words, self.settings.min_span_tokens))
        if self.settings.max_precision is not None:
            for gram in ngram_hashes(words, self.settings.precision_ngram_tokens):
                self._postings.setdefault(gram, []).append(self.examples)
        self.examples += 1

    def summary(self) -> dict[str, object]:
        """What the index holds, for the start-up log line: counts and settings, no text."""
        return {
            "enabled": self.settings.enabled,
            "examples": self.examples,
            "ngrams": len(self._spans),
            "min_span_tokens": self.settings.min_span_tokens,
            "max_precision": self.settings.max_precision,
            "withhold_as": self.settings.withhold_as,
            "seconds": round(self.build_seconds, 3),
        }

    def check(self, answer: str, prompt: str = "") -> Reason | None:
        """Why `answer` (to `prompt`) must be withheld, or None when it may go out."""
        if not self.settings.enabled or not self.examples:
            return None
        n = self.settings.min_span_tokens
        words = tokens(answer)
        if len(words) < n:
            return None
        asked = tokens(prompt) if prompt else []
        spans = ngram_hashes(words, n) & self._spans
        if spans and spans - ngram_hashes(asked, n):
            return "span"
        limit = self.settings.max_precision
        if limit is not None and self._precision(words, asked) > limit:
            return "precision"
        return None

    def _precision(self, words: Sequence[str], asked: Sequence[str]) -> float:
        """The largest share of the answer's distinct n-grams that one private example holds."""
        k = self.settings.precision_ngram_tokens
        grams = ngram_hashes(words, k)
        hits: Counter[int] = Counter()
        for gram in grams - ngram_hashes(asked, k):
            hits.update(self._postings.get(gram, ()))
        return max(hits.values(), default=0) / len(grams) if grams else 0.0

    def screen(self, answers: Iterable[Answer], prompts: Mapping[str, str]) -> Screened:
        """Each answer as it may be published, keyed by prompt id; `prompts` maps ids to prompt texts."""
        screened = Screened(answers={})
        for answer in answers:
            reason = self.check(answer.text, prompts.get(answer.prompt_id, ""))
            if reason is None:
                screened.answers[answer.prompt_id] = answer
                continue
            screened.withheld[answer.prompt_id] = reason
            if self.settings.withhold_as == "blank":
                screened.answers[answer.prompt_id] = Answer(
                    prompt_id=answer.prompt_id, text="", prompt_tokens=answer.prompt_tokens
                )
        return screened
