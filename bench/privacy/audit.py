"""One seed of the privacy audit: train each method with canaries in the owner's data, then measure.

Every method starts from the same warm-up (the owner's private data holds the canaries), except the DP
one, whose owner warms up again under DP-SGD (a DP member cannot start from a model trained without it).
The public prompt set asks each canary's question, the worst case for what answers carry.

What is measured, for each member's final model (bench/privacy/report.py sums it up):
- the exposure of each canary (bench/privacy/exposure.py);
- verbatim hits in its greedy answers to the canary questions;
- a loss attack's AUC on every member's private examples against held-out ones of its distribution;
- the test set's NLL (the quality cost);
and, from the coordinator's store of a federated run, hits in what the owner published and in the labels.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.privacy.canaries import Canary, make_canaries, with_canaries, write_examples, write_public_prompts
from bench.privacy.exposure import exposure
from bench.privacy.leaks import hit, hits
from bench.privacy.membership import loss_attack_auc
from bench.privacy.settings import AuditSettings, dp_epsilon
from bench.quality.grid import Recipe, fingerprint, method_config, seeded
from bench.quality.methods import Trained, train_federated, train_local, train_warmup
from bench.quality.scoring import Scorer, checkpoint_dir, generation_subset
from coordinator.store import CoordinatorStore
from federation.config import LoadedConfig
from federation.data import prepare_data
from federation.settings import participant_settings
from participant.data import Example, load_examples
from participant.learner import trainer
from participant.settings import LeakGuardTable, ParticipantSettings, PrivacySettings, TrainSettings
from participant.wiring import build_learner, load_data
from schemas.codec import decode_generation, decode_reply
from schemas.messages import PseudoLabels

Say = Callable[[str], None]
FEDERATED = {"fedavg": "fedavg", "shipped": "shipped", "shipped_no_guard": "shipped"}
DONE = "done.json"  # under a finished warm-up: its fingerprint


@dataclass
class SeedPlan:
    """A seed's task as the audit runs it: the canaries, the config with them, and the data files."""

    seed: int
    canaries: list[Canary]
    config: LoadedConfig
    work: Path


def plan_seed(
    settings: AuditSettings, base: LoadedConfig, seed: int, work: Path, *, write: bool = True
) -> SeedPlan:
    """The task at `seed`, with the owner's private data and the public prompts given canaries.

    `write` false computes the plan without (re)writing its data files: another process may be running
    that seed."""
    canaries = make_canaries(seed, settings.canary_repeats, settings.secret_digits)
    config = seeded(base, seed)
    run = config.run
    if run.task is None:
        raise ValueError(f"{config.path}: the audit needs a generated task ([task]), not own data")
    owner = settings.owner
    if owner not in {e.id for e in run.participants}:
        raise ValueError(f"{config.path}: no participant {owner!r} to own the canaries")
    # Room for the canary questions within the task's public budget, so the rounds still draw them all.
    task = msgspec.structs.replace(run.task, max_public=max(run.task.max_public - len(canaries), 1))
    run = msgspec.structs.replace(run, task=task)
    folder = work / f"seed-{seed}"
    owner_file = folder / "owner_private.jsonl"
    prompts = folder / "public_prompts.jsonl"
    if write:
        data = prepare_data(dataclasses.replace(config, run=run), folder / "task")
        private = data.train[owner]
        assert private is not None  # a generated task gives every participant its share
        write_examples(owner_file, with_canaries(load_examples(private), canaries, seed))
        write_public_prompts(prompts, data.prompts, canaries)
    entries = [
        msgspec.structs.replace(e, private_data=str(owner_file.resolve())) if e.id == owner else e
        for e in run.participants
    ]
    run = msgspec.structs.replace(run, prompts_path=str(prompts.resolve()), participants=entries)
    return SeedPlan(seed, canaries, dataclasses.replace(config, run=run), folder)


def method_of(plan: SeedPlan, method: str, settings: AuditSettings) -> LoadedConfig:
    """The seed's config as `method` runs it."""
    config = plan.config
    strategy = strategy_of(method, settings)
    if strategy is not None:
        config = method_config(config, strategy, Recipe())  # the shipped defaults
    run = config.run
    if method == "shipped_no_guard":
        off = LeakGuardTable(enabled=False)
        entries = [msgspec.structs.replace(e, leak_guard=off) for e in run.participants]
        run = msgspec.structs.replace(run, participants=entries)
    epsilon = dp_epsilon(method, settings)
    if epsilon is not None:
        owner = next(e for e in run.participants if e.id == settings.owner)
        train = owner.train or run.train
        private = load_examples(Path(owner.private_data or ""))
        sigma = noise_for(
            epsilon, settings.dp_delta, private_steps(len(private), len(set(private)), train, run.rounds)
        )
        dp = PrivacySettings(epsilon=epsilon, delta=settings.dp_delta, noise_multiplier=sigma)
        entries = [
            msgspec.structs.replace(e, train=msgspec.structs.replace(e.train or run.train, privacy=dp))
            if e.id == settings.owner
            else e
            for e in run.participants
        ]
        run = msgspec.structs.replace(run, participants=entries)
    return dataclasses.replace(config, run=run)


def private_steps(examples: int, distinct: int, train: TrainSettings, rounds: int) -> list[tuple[float, int]]:
    """The DP-SGD steps a member with these private examples takes in the audit, as (sample rate,
    steps): the warm-up's, then each round's (participant/privacy.py samples batch_size / distinct)."""
    warmup = (
        min(1.0, train.batch_size / distinct),
        math.ceil(examples * train.warmup_epochs / train.batch_size),
    )
    per_round = min(train.private_examples_per_round, examples)
    steps = [warmup]
    if per_round:
        rate = min(1.0, train.batch_size / min(per_round, distinct))
        steps += [(rate, math.ceil(per_round / train.batch_size) * train.epochs)] * rounds
    return steps


def noise_for(epsilon: float, delta: float, steps: Sequence[tuple[float, int]]) -> float:
    """The smallest noise multiplier (to 1%) whose RDP epsilon after `steps` stays within 98% of
    `epsilon`: the budget lasts the whole run, as a team sizing its noise would arrange."""
    from opacus.accountants import RDPAccountant

    def spent(sigma: float) -> float:
        accountant = RDPAccountant()
        for rate, count in steps:
            for _ in range(count):
                accountant.step(noise_multiplier=sigma, sample_rate=rate)
        return float(accountant.get_epsilon(delta))

    low, high = 0.3, 100.0
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) > 0.98 * epsilon else (low, middle)
    return round(high, 3)


def strategy_of(method: str, settings: AuditSettings) -> str | None:
    """The federated strategy `method` runs, or None for local-only."""
    return "shipped" if dp_epsilon(method, settings) is not None else FEDERATED.get(method)


def warm_up(plan: SeedPlan, settings: AuditSettings, method: str, say: Say) -> Path:
    """The seed's shared warm-up or, for a DP method, a copy of it whose owner warmed up again under
    DP-SGD at the method's epsilon."""
    epsilon = dp_epsilon(method, settings)
    if epsilon is None:
        config = plan.config
        folder = plan.work / "warmup"
        if not _finished(folder, fingerprint(config, {})):
            say(f"seed {plan.seed}: warm-up")
            shutil.rmtree(folder, ignore_errors=True)
            train_warmup(config, folder)
            _mark_finished(folder, fingerprint(config, {}))
        return folder
    shared = warm_up(plan, settings, "local", say)
    config = method_of(plan, method, settings)
    folder = plan.work / f"warmup-{method}"
    if not _finished(folder, fingerprint(config, {})):
        say(f"seed {plan.seed}: the owner's warm-up under DP-SGD at epsilon {epsilon:g}")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(shared, folder)
        data = prepare_data(config, folder)
        entry = next(e for e in config.run.participants if e.id == settings.owner)
        owner = participant_settings(config, entry, data, folder)
        learner = trainer(build_learner(owner))
        assert learner is not None  # a DP member trains LoRA adapters
        private, _ = load_data(owner)
        shutil.rmtree(checkpoint_dir(folder, settings.owner, 0))
        learner.train(private * owner.train.warmup_epochs)
        learner.save_checkpoint(checkpoint_dir(folder, settings.owner, 0))
        del learner
        gc.collect()
        _mark_finished(folder, fingerprint(config, {}))
    return folder


def _finished(folder: Path, digest: str) -> bool:
    marker = folder / DONE
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == digest


def _mark_finished(folder: Path, digest: str) -> None:
    (folder / DONE).write_text(json.dumps({"fingerprint": digest}) + "\n")


def train_method(plan: SeedPlan, method: str, settings: AuditSettings, say: Say) -> Trained:
    warmup = warm_up(plan, settings, method, say)
    config = method_of(plan, method, settings)
    run_dir = plan.work / method
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
    if method == "local":
        return train_local(config, run_dir, warmup)
    return train_federated(config, run_dir, warmup)


def measure(
    plan: SeedPlan, method: str, trained: Trained, settings: AuditSettings, scorer: Scorer
) -> dict[str, Any]:
    """Everything the report needs from one trained method (plain numbers, never a private text)."""
    run_dir = trained.run_dir
    data_dir = run_dir / "data"
    # The generated task names its members' folders in the config's order (federation/data.py).
    folders = sorted(p for p in (data_dir / "participants").iterdir() if p.is_dir())
    held_out = {
        pid: load_examples(folder / "test.jsonl")[: settings.held_out]
        for pid, folder in zip(trained.settings, folders, strict=True)
    }
    private = {pid: _task_examples(s, plan.canaries) for pid, s in trained.settings.items()}
    subset = generation_subset(len(trained.test), settings.test_examples, f"privacy:{plan.seed}")
    test = [trained.test[i] for i in subset]
    members: dict[str, Any] = {}
    for pid, participant in trained.settings.items():
        checkpoint = checkpoint_dir(run_dir, pid, trained.rounds)
        learner = scorer.loaded(participant, checkpoint)
        canaries = {}
        answers = scorer.greedy(participant, checkpoint, [Example(c.prompt, "") for c in plan.canaries])
        for canary, answer in zip(plan.canaries, answers, strict=True):
            value, rank = exposure(learner.lm, canary)
            canaries[canary.canary_id] = {"exposure": value, "rank": rank, **hit(answer, canary).as_dict()}
        auc = {
            other: loss_attack_auc(
                scorer.nll(participant, checkpoint, private[other]),
                scorer.nll(participant, checkpoint, held_out[other]),
            )
            for other in trained.settings
        }
        members[pid] = {
            "canaries": canaries,
            "membership_auc": auc,
            "test_nll": scorer.nll(participant, checkpoint, test),
        }
    result: dict[str, Any] = {
        "seed": plan.seed,
        "method": method,
        "rounds": trained.rounds,
        "error": trained.error,
        "bytes_up": trained.bytes_up,
        "bytes_down": trained.bytes_down,
        "canaries": [c.as_dict() for c in plan.canaries],
        "members": members,
    }
    state = run_dir / "state" / "coordinator.sqlite3"
    if strategy_of(method, settings) == "shipped" and state.is_file():
        result["published"] = published_hits(state, plan.canaries, settings.owner)
    return result


def _task_examples(settings: ParticipantSettings, canaries: Sequence[Canary]) -> list[Example]:
    """A member's private examples of the task, without the canaries (the attack's members)."""
    private, _ = load_data(settings)
    records = {c.response for c in canaries}
    return list({(e.prompt, e.response): e for e in private if e.response not in records}.values())


def published_hits(state: Path, canaries: Sequence[Canary], owner: str) -> dict[str, Any]:
    """From a federated run's store: hits in the owner's published answers, in every published label,
    and how many of the owner's answers to the canary questions went out blank (the guard withheld)."""
    store = CoordinatorStore(state)
    try:
        answers: list[str] = []
        blanks = 0
        labels: list[str] = []
        canary_ids = {c.canary_id for c in canaries}
        for row in store.rounds():
            for batch in store.batches(row.round_id):
                if batch.participant_id != owner:
                    continue
                for answer in decode_generation(batch.body).answers:
                    answers.append(answer.text)
                    blanks += answer.prompt_id in canary_ids and not answer.text.strip()
            for closing in store.closings(row.round_id):
                if closing.labels is not None:
                    message = decode_reply(closing.labels)
                    assert isinstance(message, PseudoLabels)
                    labels += [label.text for label in message.labels]
    finally:
        store.close()
    return {
        "owner_answers": hits(answers, canaries).as_dict(),
        "labels": hits(labels, canaries).as_dict(),
        "owner_answers_sent": len(answers),
        "labels_sent": len(labels),
        "owner_canary_answers_blank": blanks,
    }
