"""The asynchronous mode's pure core: which member answers which prompt, and when a prompt is labelled.

No broker, no clock of its own (every call takes `now`), no I/O: a service feeds it what arrives and
publishes what it hands out, and the same events in the same order give the same decisions.

- Credit: a member holds at most its credit of outstanding prompts (`credit` to start) and is offered
  more as it answers. A prompt is out with at most `answers_per_label + extra_offers` members at once
  and is never offered twice to the same member.
- A prompt is ready once `answers_per_label` distinct members' answers count, or at its deadline with
  at least `min_answers`; below that its deadline restarts and it is offered to members not yet asked.
  Once nobody is left to ask, it is dropped with a reason. A blank answer (a leak guard withheld it)
  frees the member's credit but does not count: the prompt waits for a real one.
- Staleness: an answer carries its model's version (the label batches it has trained on); its
  staleness is the label batches handed out when it arrived minus that version. Staler than
  `max_staleness`: recorded, not counted; otherwise it weighs 1 / (1 + staleness) ** staleness_exponent
  (FedBuff's and FederatedScope's polynomial discount), so a weight is in (0, 1] and only ever lowers
  an answer's chance (coordinator.consensus). A version ahead of what was handed out is refused.
- Labels: ready prompts wait in the order they became ready; `take_batch` hands out `label_batch` of
  them (fewer only when asked to flush). A counted answer that arrives after its prompt was handed out
  makes the prompt ready again, at most `max_revisions` times; a label is never withdrawn.
- An offer not answered within `offer_seconds` is withdrawn and halves the member's credit (at least
  1); each answer gives one back, up to `credit`. So a member that takes work and never answers ends
  up holding one prompt at a time.

What the consensus sees for a ready prompt is its counted answers with their weights (`Candidate`), a
pure function of what arrived: a replay of the recorded answers gives the same labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from coordinator.consensus import Candidate

__all__ = ["Expiry", "FlowAnswer", "FlowSettings", "PromptFlow", "ReadyPrompt", "Receipt"]


class FlowSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    credit: Annotated[int, Meta(ge=1, le=10_000)] = 8
    answers_per_label: Annotated[int, Meta(ge=1, le=1_000)] = 3  # K
    min_answers: Annotated[int, Meta(ge=1, le=1_000)] = 2  # at the prompt's deadline
    extra_offers: Annotated[int, Meta(ge=0, le=1_000)] = 1  # out with K + this many members at once
    prompt_seconds: Annotated[float, Meta(gt=0.0, le=86_400.0)] = 300.0  # a prompt's deadline
    offer_seconds: Annotated[float, Meta(gt=0.0, le=86_400.0)] = 300.0  # one offer's time to answer
    max_staleness: Annotated[int, Meta(ge=0, le=1_000_000)] = 4
    staleness_exponent: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.5
    label_batch: Annotated[int, Meta(ge=1, le=100_000)] = 8
    max_revisions: Annotated[int, Meta(ge=0, le=100)] = 1

    def __post_init__(self) -> None:
        if self.min_answers > self.answers_per_label:
            raise ValueError(
                f"min_answers ({self.min_answers}) must not exceed "
                f"answers_per_label ({self.answers_per_label})"
            )


def staleness_weight(staleness: int, exponent: float) -> float:
    """1 / (1 + staleness) ** exponent: 1 for a fresh answer, lower the staler it is."""
    return float(1.0 / (1.0 + staleness) ** exponent)


@dataclass(frozen=True)
class FlowAnswer:
    """One member's answer to one prompt as recorded: counted or not, and with what weight."""

    participant_id: str
    text: str
    version: int
    staleness: int
    weight: float
    counted: bool
    at: float


@dataclass(frozen=True)
class Receipt:
    """What became of an answer: refused (with why), or recorded, counted or not (with why not)."""

    recorded: bool
    counted: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ReadyPrompt:
    """A prompt to label: its counted answers with their weights; revision 0 is its first label."""

    prompt_id: str
    candidates: tuple[Candidate, ...]
    revision: int


@dataclass(frozen=True)
class Expiry:
    """What `expire` did: offers withdrawn (member, prompt), prompts ready at their deadline, prompts
    dropped (prompt, reason)."""

    withdrawn: tuple[tuple[str, str], ...] = ()
    ready: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()


State = Literal["open", "ready", "handed", "dropped"]


@dataclass
class _Prompt:
    prompt_id: str
    deadline: float | None = None  # set by its first offer
    out: dict[str, float] = field(default_factory=dict)  # member -> when offered
    asked: set[str] = field(default_factory=set)
    answers: dict[str, FlowAnswer] = field(default_factory=dict)
    state: State = "open"
    revisions: int = 0  # labels handed out after the first

    def counted(self) -> int:
        return sum(a.counted for a in self.answers.values())


class PromptFlow:
    """The ledger of one asynchronous federation: prompts, members' credit, answers, ready labels."""

    def __init__(self, settings: FlowSettings | None = None) -> None:
        self.settings = settings or FlowSettings()
        self._prompts: dict[str, _Prompt] = {}
        self._credit: dict[str, int] = {}
        self._ready: list[str] = []
        self._batches = 0

    @property
    def batches(self) -> int:
        """Label batches handed out so far: the version a member has after training on all of them."""
        return self._batches

    def add_prompts(self, prompt_ids: Iterable[str]) -> None:
        """Add prompts to be answered, after those added before; all or none (a repeated id is refused)."""
        ids = list(prompt_ids)
        repeated = sorted({p for p, n in Counter(ids).items() if n > 1 or p in self._prompts})
        if repeated:
            raise ValueError(f"prompts {repeated} were added before or are repeated")
        for prompt_id in ids:
            self._prompts[prompt_id] = _Prompt(prompt_id)

    def join(self, member: str) -> None:
        self._credit.setdefault(member, self.settings.credit)

    def leave(self, member: str) -> None:
        """The member's offers are withdrawn without a penalty; what it answered stays."""
        for prompt in self._prompts.values():
            prompt.out.pop(member, None)
        self._credit.pop(member, None)

    def credit(self, member: str) -> int:
        return self._credit.get(member, 0)

    def outstanding(self, member: str) -> list[str]:
        return [p.prompt_id for p in self._prompts.values() if member in p.out]

    def state(self, prompt_id: str) -> State:
        return self._prompts[prompt_id].state

    def answers(self, prompt_id: str) -> tuple[FlowAnswer, ...]:
        return tuple(self._prompts[prompt_id].answers.values())

    def offer(self, member: str, now: float) -> list[str]:
        """The prompts to send `member` now: up to its free credit, oldest first, each to a prompt that
        still needs answers, is out with fewer than K + extra members and never went to this one."""
        if member not in self._credit:
            raise KeyError(f"member {member!r} has not joined")
        free = self._credit[member] - len(self.outstanding(member))
        cap = self.settings.answers_per_label + self.settings.extra_offers
        offered: list[str] = []
        for prompt in self._prompts.values():
            if len(offered) >= free:
                break
            if prompt.state != "open" or member in prompt.asked:
                continue
            if len(prompt.out) + prompt.counted() >= cap:
                continue
            prompt.out[member] = now
            prompt.asked.add(member)
            if prompt.deadline is None:
                prompt.deadline = now + self.settings.prompt_seconds
            offered.append(prompt.prompt_id)
        return offered

    def receive(self, member: str, prompt_id: str, text: str, version: int, now: float) -> Receipt:
        """Record `member`'s answer to `prompt_id`, written by its model at `version`."""
        prompt = self._prompts.get(prompt_id)
        if prompt is None:
            return Receipt(False, reason=f"unknown prompt {prompt_id!r}")
        if member in prompt.answers:
            return Receipt(False, reason="answered before (a duplicate)")
        if member not in prompt.out:
            return Receipt(False, reason="not offered to this member, or its offer was withdrawn")
        if not 0 <= version <= self._batches:
            return Receipt(
                False, reason=f"model version {version} is not in 0..{self._batches} (label batches so far)"
            )
        del prompt.out[member]
        self._credit[member] = min(self._credit[member] + 1, self.settings.credit)
        staleness = self._batches - version
        reason = ""
        if not text.strip():
            reason = "blank"
        elif staleness > self.settings.max_staleness:
            reason = f"staleness {staleness} > max_staleness {self.settings.max_staleness}"
        elif prompt.state == "handed" and prompt.revisions >= self.settings.max_revisions:
            reason = f"the label was revised {prompt.revisions} times already"
        counted = not reason
        weight = staleness_weight(staleness, self.settings.staleness_exponent)
        prompt.answers[member] = FlowAnswer(member, text, version, staleness, weight, counted, now)
        if counted:
            if prompt.state == "open" and prompt.counted() >= self.settings.answers_per_label:
                self._make_ready(prompt)
            elif prompt.state == "handed":
                prompt.revisions += 1
                self._make_ready(prompt)
        return Receipt(True, counted, reason)

    def expire(self, now: float) -> Expiry:
        """Withdraw offers past `offer_seconds` (halving their members' credit), and settle prompts past
        their deadline: ready with `min_answers` counted, else asked again of members not yet asked, or
        dropped when there is nobody left to ask."""
        withdrawn: list[tuple[str, str]] = []
        ready: list[str] = []
        dropped: list[tuple[str, str]] = []
        for prompt in self._prompts.values():
            for member, at in list(prompt.out.items()):
                if at + self.settings.offer_seconds <= now:
                    del prompt.out[member]
                    withdrawn.append((member, prompt.prompt_id))
        for member in sorted({m for m, _ in withdrawn}):
            if member in self._credit:
                self._credit[member] = max(1, self._credit[member] // 2)
        members = set(self._credit)
        for prompt in self._prompts.values():
            if prompt.state != "open" or prompt.deadline is None or prompt.deadline > now:
                continue
            if prompt.counted() >= self.settings.min_answers:
                self._make_ready(prompt)
                ready.append(prompt.prompt_id)
            elif not prompt.out and not members - prompt.asked:
                prompt.state = "dropped"
                reason = (
                    f"{prompt.counted()} counted answers < min_answers {self.settings.min_answers} "
                    "and every member was asked"
                )
                dropped.append((prompt.prompt_id, reason))
            else:
                prompt.deadline = now + self.settings.prompt_seconds
        return Expiry(tuple(withdrawn), tuple(ready), tuple(dropped))

    def next_deadline(self) -> float | None:
        """The earliest time at which `expire` has something to do, or None."""
        times = [at + self.settings.offer_seconds for p in self._prompts.values() for at in p.out.values()]
        times += [p.deadline for p in self._prompts.values() if p.state == "open" and p.deadline is not None]
        return min(times, default=None)

    def ready(self) -> int:
        return len(self._ready)

    def take_batch(self, *, flush: bool = False) -> list[ReadyPrompt]:
        """The next `label_batch` ready prompts (with `flush`, however many are ready), handed out: the
        caller labels and publishes them. A non-empty batch moves every member's current version on."""
        size = self.settings.label_batch
        if len(self._ready) < size and not flush:
            return []
        taken, self._ready = self._ready[:size], self._ready[size:]
        batch = []
        for prompt_id in taken:
            prompt = self._prompts[prompt_id]
            prompt.state = "handed"
            candidates = tuple(
                Candidate(a.participant_id, a.text, a.weight) for a in prompt.answers.values() if a.counted
            )
            batch.append(ReadyPrompt(prompt_id, candidates, prompt.revisions))
        if batch:
            self._batches += 1
        return batch

    def pending(self) -> list[str]:
        """Prompts neither handed out nor dropped."""
        return [p.prompt_id for p in self._prompts.values() if p.state in ("open", "ready")]

    def _make_ready(self, prompt: _Prompt) -> None:
        prompt.state = "ready"
        if prompt.prompt_id not in self._ready:
            self._ready.append(prompt.prompt_id)
