"""The coordinator service: wires the round engine, consensus and the store to a transport.

Intake handlers validate, persist and then ack; they never wait for other
participants, so no delivery is held unacked across a round. A single driver
task opens rounds, closes shards when the engine says so, and publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from broker.errors import BrokerError, Unroutable
from broker.topology import (
    ANNOUNCE_EXCHANGE,
    COORDINATOR_USER,
    DIRECT_EXCHANGE,
    LOBBY_QUEUE,
    MAX_BCC_KEYS,
    SHARED_REPLY_KEY,
    core_topology,
    intake_queue,
    intake_topology,
    participant_topology,
    reply_key,
)
from broker.transport import Delivery, Handler, Subscription, Transport
from coordinator.consensus import Candidate, ConsensusStrategy
from coordinator.fedavg import average_wire, tensors_from_wire
from coordinator.identity import identity_problem, ownership_problem, shard_of_routing_key
from coordinator.labelling import pseudo_labels_message, shard_candidates
from coordinator.prompts import PromptSampler, PublicPrompt, split_into_shards
from coordinator.rounds import Acceptance, RoundState, ShardClosing, resolve_quorum
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore, NewBatch, RoundRow, Stored
from schemas.codec import MAX_SMALL_CONTROL_BYTES, decode_control, decode_generation, decode_reply, encode
from schemas.errors import ChorusError, SchemaError
from schemas.messages import (
    AdapterUpdate,
    AggregatedAdapter,
    GenerationBatch,
    Heartbeat,
    Join,
    Message,
    ParticipantReport,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
    ShardOutcome,
)

log = structlog.get_logger(__name__)
DecodedT = TypeVar("DecodedT")

FEDAVG_SHARD = 0  # a FedAvg round has one "shard": the adapter uploads
# Group commit of intake writes: the group closes once no write joined it for GROUP_COMMIT_PAUSE seconds,
# after GROUP_COMMIT_WAIT seconds in all, or at GROUP_COMMIT_MAX writes.
GROUP_COMMIT_PAUSE = 0.001
GROUP_COMMIT_WAIT = 0.01
GROUP_COMMIT_MAX = 1024
# Bodies larger than this are decoded in a worker thread, so that a large (or hostile) one does not
# stall every other member's intake on the event loop.
OFF_LOOP_DECODE_BYTES = 64 * 1024
# A member's last-seen time is written at most this often; more heartbeats than that change nothing.
TOUCH_INTERVAL_SECONDS = 1.0


@dataclass
class Counters:
    """What the coordinator did, for status lines and tests."""

    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    benched: list[tuple[int, str]] = field(default_factory=list)  # (round, member) as each was benched

    def reject(self, reason: str) -> None:
        self.dead_lettered += 1
        key = reason.split(":")[0].split(" ")[0]
        self.rejections[key] = self.rejections.get(key, 0) + 1


class Coordinator:
    def __init__(
        self,
        settings: CoordinatorSettings,
        transport: Transport,
        store: CoordinatorStore,
        prompts: Sequence[PublicPrompt],
        strategy: ConsensusStrategy | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.strategy == "semantic" and strategy is None:
            raise ValueError("the semantic strategy needs a consensus strategy object")
        self.settings = settings
        self.transport = transport
        self.store = store
        self.strategy = strategy
        self.clock = clock
        self.counters = Counters()
        self.round: RoundState | None = None
        self.closed_rounds: list[RoundClosed] = []
        self._sampler = PromptSampler(prompts, settings.round.seed)
        self._prompt_text = {p.prompt_id: p.text for p in prompts}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._subscriptions: list[Subscription] = []
        self._declared_participants: set[str] = set()
        self._consensus_seconds = 0.0
        self._pending_announcement: RoundRow | None = None
        self._pending_writes: list[PendingWrite] = []
        self._committing: asyncio.Task[None] | None = None
        self._intake_open = False
        self._consumed: set[str] = set()  # participants whose intake queue this coordinator consumes
        self._touched: dict[str, float] = {}  # member -> when its last-seen time was last written

    # -- lifecycle ---------------------------------------------------------

    def request_stop(self) -> None:
        """Stop intake and return from `run()` after the current step (SIGTERM)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        await self.start()
        try:
            await self.drive()
        finally:
            await self.stop_intake()

    async def start(self) -> None:
        await self.transport.declare(core_topology())
        members = [m.participant_id for m in self.store.members()]
        await self._declare_participants([*self.settings.roster, *members])
        self._restore()
        await self._resume_announcement()
        # Every member's traffic waits in its own intake queue (a bulkhead: a flood fills only the
        # flooder's queue); the lobby holds what comes from participants that have none yet.
        self._intake_open = True
        owners = [None, *sorted(self._declared_participants)]
        await self._consume_intake(owners)

    async def _consume_intake(self, owners: Sequence[str | None]) -> None:
        """Subscribe to these participants' intake queues (None: the lobby), concurrently: each consumer
        costs a few broker round trips, and one after another they would hold back intake."""
        prefetch = self.settings.prefetch
        self._consumed.update(o for o in owners if o is not None)
        outcomes = await asyncio.gather(
            *(
                self.transport.consume(
                    LOBBY_QUEUE if owner is None else intake_queue(owner),
                    self._intake(owner),
                    prefetch=prefetch,
                )
                for owner in owners
            ),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        for owner, outcome in zip(owners, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                self._consumed.discard(owner or "")
            else:
                self._subscriptions.append(outcome)
        if failure is not None:
            raise failure

    async def stop_intake(self) -> None:
        self._intake_open = False
        self._consumed.clear()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                await subscription.cancel()
            except BrokerError as e:
                log.warning("cancel_failed", error=str(e))

    async def drive(self) -> None:
        """Run rounds until the configured number is done or a stop is requested."""
        wanted = self.settings.round.rounds
        while not self._stopping.is_set():
            if self.round is None:
                if wanted and self.store.last_round_id() >= wanted:
                    return
                if not await self._open_round():
                    continue
            await self._advance_round()

    # -- rounds ------------------------------------------------------------

    def active_members(self) -> list[str]:
        horizon = self.clock() - self.settings.round.member_timeout_seconds
        return [m.participant_id for m in self.store.members() if m.last_seen_unix >= horizon]

    async def _open_round(self) -> bool:
        settings = self.settings.round
        active = self.active_members()
        if len(active) < settings.min_participants:
            await self._sleep_until_woken(1.0)
            return False
        round_id = self.store.last_round_id() + 1
        benched = self._benched(round_id, active)
        quorum = resolve_quorum(settings.quorum, len(active) - len(benched))
        now = self.clock()
        if self.settings.strategy == "semantic":
            chosen = self._sampler.sample(
                round_id, settings.prompts_per_round, self._carried_prompt_ids(round_id)
            )
            shards = split_into_shards(chosen, settings.shards)
        else:
            shards = []
        opened = RoundOpened(
            federation=self.settings.federation,
            round_id=round_id,
            message_id=f"{self.settings.federation}.r{round_id}.opened",
            participant_id=COORDINATOR_USER,
            strategy=self.settings.strategy,
            shards=shards,
            generation=self.settings.generation,
            expected=sorted(active),
            quorum=quorum,
            deadline_unix=now + settings.deadline_seconds,
            opened_unix=now,
        )
        body = encode(opened)
        self.store.insert_round(
            round_id=round_id,
            opened_unix=now,
            deadline_unix=opened.deadline_unix,
            quorum=quorum,
            expected=active,
            announcement=body,
        )
        self.round = self._round_state(opened, benched)
        self._report_benching(round_id, benched, active)
        await self._announce(round_id, body, opened.message_id, active)
        log.info(
            "round_opened",
            round=round_id,
            participants=len(active),
            quorum=quorum,
            shards=len(shards),
            benched=sorted(benched),
        )
        return True

    def _benched(self, round_id: int, members: Sequence[str]) -> set[str]:
        """Members that answered nothing, in time or late, in each of the last `bench_after_missed_rounds`
        rounds: still asked, no longer waited for, until they answer again. Never all of them."""
        rounds = self.settings.round.bench_after_missed_rounds
        if rounds == 0 or round_id <= rounds:
            return set()
        summaries = self.store.summaries(round_id - rounds, round_id - 1)
        if len(summaries) < rounds:
            return set()
        missing = [set(decode_summary(body).missing) for body in summaries]
        benched = set(members).intersection(*missing)
        return set() if benched >= set(members) else benched

    def _report_benching(self, round_id: int, benched: set[str], members: Sequence[str]) -> None:
        before = self._benched(round_id - 1, self.store.expected(round_id - 1)) if round_id > 1 else set()
        for member in sorted(benched - before):
            self.counters.benched.append((round_id, member))
            log.warning(
                "member_benched",
                round=round_id,
                participant=member,
                missed_rounds=self.settings.round.bench_after_missed_rounds,
                hint="asked but not waited for until it answers again",
            )
        for member in sorted((before - benched) & set(members)):
            log.info("member_unbenched", round=round_id, participant=member)

    def _round_state(self, opened: RoundOpened, benched: set[str]) -> RoundState:
        shards = {s.shard_id: [p.prompt_id for p in s.prompts] for s in opened.shards}
        return RoundState(
            round_id=opened.round_id,
            shards=shards or {FEDAVG_SHARD: []},
            expected=opened.expected,
            quorum=opened.quorum,
            opened_at=opened.opened_unix,
            deadline_at=opened.deadline_unix,
            grace_seconds=self.settings.round.grace_seconds,
            benched=benched,
        )

    def _carried_prompt_ids(self, round_id: int) -> list[str]:
        """Prompts of the previous round's failed shards go first into this round."""
        if round_id <= 1:
            return []
        failed = {c.shard_id for c in self.store.closings(round_id - 1) if c.status == "failed"}
        previous = self._announcement(round_id - 1)
        if previous is None:
            return []
        return [p.prompt_id for s in previous.shards if s.shard_id in failed for p in s.prompts]

    def _announcement(self, round_id: int) -> RoundOpened | None:
        for row in self.store.rounds():
            if row.round_id == round_id:
                message = decode_reply(row.announcement)
                assert isinstance(message, RoundOpened)
                return message
        return None

    async def _announce(self, round_id: int, body: bytes, message_id: str, recipients: Sequence[str]) -> None:
        await self._declare_participants(recipients)
        await self.transport.publish(
            ANNOUNCE_EXCHANGE, "", body, message_id=message_id, timeout=self.settings.publish_timeout_seconds
        )
        self.store.record_publication(message_id, round_id, recipients, "round_opened", len(body))
        self.store.mark_announced(round_id)

    async def _advance_round(self) -> None:
        state = self.round
        assert state is not None
        # The engine counts a batch as answered before its group commit lands; a shard must not
        # close over a batch that is not in the store yet, so commit what intake holds first.
        await self._commit_intake()
        closings = state.due(self.clock())
        if closings:
            await self._close_shards(state, closings)
        if state.is_finished:
            await self._close_round(state)
            self.round = None
            return
        wakeup = state.next_wakeup()
        delay = 1.0 if wakeup is None else max(0.0, wakeup - self.clock())
        await self._sleep_until_woken(delay)

    async def _sleep_until_woken(self, delay: float) -> None:
        self._wake.clear()
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay)

    # -- closing shards ----------------------------------------------------

    async def _close_shards(self, state: RoundState, closings: Sequence[ShardClosing]) -> None:
        """Close every shard that became due together: one transaction per step, not one per shard.

        Shards that stop taking answers at the same time (typically many, at the end of intake) have
        their frozen answer sets stored in one transaction, their consensus run concurrently, their
        labels stored in one transaction and published all at once, so closing twenty shards costs
        about what closing one did.
        """
        with self.store.transaction():
            for closing in closings:
                self.store.save_closing(
                    state.round_id, closing.shard_id, closing.status, closing.reason, closing.answered
                )
        for closing in closings:
            log.info(
                "shard_closing",
                round=state.round_id,
                shard=closing.shard_id,
                status=closing.status,
                reason=closing.reason,
                answered=len(closing.answered),
            )
        labelled = [closing for closing in closings if closing.status == "labelled"]
        if labelled and self.settings.strategy == "semantic":
            await self._label_shards(state, labelled)
        else:
            for closing in labelled:
                await self._aggregate_adapters(state, closing.answered)
        for closing in closings:
            state.finish(closing.shard_id, closing.status)

    async def _label_shards(self, state: RoundState, closings: Sequence[ShardClosing]) -> None:
        stored = {row.shard_id: row.labels for row in self.store.closings(state.round_id)}
        undecided = [c for c in closings if stored[c.shard_id] is None]  # the others: before a restart
        if undecided:
            decided = await self._run_consensus(state, undecided)
            with self.store.transaction():
                for closing, (body, agreement) in zip(undecided, decided, strict=True):
                    self.store.save_labels(state.round_id, closing.shard_id, body, agreement)
                    stored[closing.shard_id] = body
        # Publish exactly what is stored: a decision made before a restart is re-sent as it was.
        bodies = [stored[c.shard_id] for c in closings]
        await self._publish_to_members(state, [b for b in bodies if b is not None], "pseudo_labels")

    async def _run_consensus(
        self, state: RoundState, closings: Sequence[ShardClosing]
    ) -> list[tuple[bytes, dict[str, float]]]:
        """Each shard's answers read back from the store and decided, one shard after another in one
        worker thread (the event loop keeps taking deliveries meanwhile); per shard the encoded
        PseudoLabels and the agreement."""
        strategy = self.strategy
        assert strategy is not None
        round_id = state.round_id
        shards = [(c.shard_id, state.shards[c.shard_id].prompt_ids, set(c.answered)) for c in closings]
        started = time.perf_counter()
        results = await asyncio.to_thread(
            lambda: [strategy.decide(self._candidates(round_id, *shard)) for shard in shards]
        )
        self._consensus_seconds += time.perf_counter() - started
        decided = []
        federation = self.settings.federation
        for closing, result in zip(closings, results, strict=True):
            message = pseudo_labels_message(federation, state.round_id, closing.shard_id, result)
            log.info(
                "consensus",
                round=state.round_id,
                shard=closing.shard_id,
                labelled=len(message.labels),
                abstained=len(message.abstained),
            )
            decided.append((encode(message), {p: float(a) for p, a in result.agreement.items()}))
        return decided

    def _candidates(
        self, round_id: int, shard_id: int, prompt_ids: Sequence[str], answered: set[str]
    ) -> dict[str, list[Candidate]]:
        fresh = [
            decode_generation(row.body)
            for row in self.store.batches(round_id, shard_id)
            if not row.late and row.participant_id in answered
        ]
        carried = []
        if self.settings.round.late_policy == "carry" and round_id > 1:
            carried = [decode_generation(row.body) for row in self.store.batches(round_id - 1) if row.late]
        return shard_candidates(prompt_ids, fresh, carried, self.settings.round.staleness_weight)

    async def _aggregate_adapters(self, state: RoundState, answered: Sequence[str]) -> None:
        updates = []
        for participant_id, body in self.store.adapters(state.round_id):
            if participant_id in answered:
                update = decode_control(body)
                assert isinstance(update, AdapterUpdate)
                updates.append((update.tensors, update.num_samples))
        averaged = await asyncio.to_thread(average_wire, updates)  # keeps the participants' dtype
        message = AggregatedAdapter(
            federation=self.settings.federation,
            round_id=state.round_id,
            message_id=f"{self.settings.federation}.r{state.round_id}.adapter",
            participant_id=COORDINATOR_USER,
            tensors=averaged,
            contributors=sorted(answered),
        )
        await self._publish_to_members(state, [encode(message)], "aggregated_adapter")

    async def _publish_to_members(self, state: RoundState, bodies: Sequence[bytes], kind: str) -> None:
        """Send each body to everyone expected or active now (stragglers too, so they catch up).

        One confirmed publish per body carries it to all its recipients (their reply keys in BCC), so
        closing a shard costs one broker round trip, not one per participant.
        """
        recipients = sorted(set(state.expected) | set(self.active_members()))
        # Declared first: a BCC publish reports only a message that reached no queue at all.
        await self._declare_participants(recipients)
        pending: list[tuple[str, list[str], bytes]] = []  # (message id, participants, body)
        for body in bodies:
            message: Message = decode_reply(body)
            unsent = [p for p in recipients if not self.store.was_published(f"{message.message_id}@{p}")]
            for start in range(0, len(unsent), MAX_BCC_KEYS):
                pending.append((message.message_id, unsent[start : start + MAX_BCC_KEYS], body))

        async def publish(message_id: str, participant_ids: list[str], body: bytes) -> None:
            keys = [reply_key(p) for p in participant_ids]
            routing_key, bcc = (keys[0], []) if len(keys) == 1 else (SHARED_REPLY_KEY, keys)
            await self.transport.publish(
                DIRECT_EXCHANGE,
                routing_key,
                body,
                message_id=message_id,
                timeout=self.settings.publish_timeout_seconds,
                bcc=bcc,
            )

        # Concurrently, each confirmed on its own; the confirmed ones are recorded in one transaction.
        outcomes = await asyncio.gather(*(publish(*p) for p in pending), return_exceptions=True)
        failure: BaseException | None = None
        with self.store.transaction():
            for (message_id, participant_ids, body), outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, Unroutable):
                    log.warning(
                        "no_reply_queue", round=state.round_id, participants=participant_ids, kind=kind
                    )
                elif isinstance(outcome, BaseException):
                    failure = failure or outcome
                else:
                    for participant_id in participant_ids:
                        key = f"{message_id}@{participant_id}"
                        self.store.record_publication(key, state.round_id, [participant_id], kind, len(body))
        if failure is not None:
            raise failure

    async def _close_round(self, state: RoundState) -> None:
        closings = self.store.closings(state.round_id)
        outcomes = []
        for c in closings:
            labelled, abstained = self._count_labels(c.labels)
            outcomes.append(
                ShardOutcome(
                    shard_id=c.shard_id,
                    status=c.status,
                    reason=c.reason[:256],
                    answered=list(c.answered),
                    labelled=labelled,
                    abstained=abstained,
                )
            )
        agreement = mean_agreement([c.agreement or {} for c in closings])
        now = self.clock()
        summary = RoundClosed(
            federation=self.settings.federation,
            round_id=state.round_id,
            message_id=f"{self.settings.federation}.r{state.round_id}.closed",
            participant_id=COORDINATOR_USER,
            shards=outcomes,
            answered=sorted(state.answered_all_shards()),
            late=sorted(state.late),
            missing=sorted(state.missing()),
            agreement=agreement,
            bytes_received=self.store.traffic(state.round_id, "in"),
            bytes_sent=self.store.traffic(state.round_id, "out"),
            opened_unix=state.opened_at,
            closed_unix=now,
            consensus_seconds=self._consensus_seconds,
        )
        body = encode(summary)
        if not self.store.was_published(summary.message_id):
            await self.transport.publish(
                ANNOUNCE_EXCHANGE,
                "",
                body,
                message_id=summary.message_id,
                timeout=self.settings.publish_timeout_seconds,
            )
            self.store.record_publication(summary.message_id, state.round_id, [], "round_closed", len(body))
        self.store.close_round(state.round_id, now, body)
        self.closed_rounds.append(summary)
        self._consensus_seconds = 0.0
        log.info(
            "round_closed",
            round=state.round_id,
            answered=len(summary.answered),
            late=summary.late,
            missing=summary.missing,
            failed_shards=[o.shard_id for o in outcomes if o.status == "failed"],
        )

    @staticmethod
    def _count_labels(body: bytes | None) -> tuple[int, int]:
        if body is None:
            return 0, 0
        message = decode_reply(body)
        assert isinstance(message, PseudoLabels)
        return len(message.labels), len(message.abstained)

    # -- restart -----------------------------------------------------------

    def _restore(self) -> None:
        """Rebuild the open round, if any, from the store after a restart."""
        row = self.store.open_round()
        if row is None:
            return
        opened = decode_reply(row.announcement)
        assert isinstance(opened, RoundOpened)
        state = self._round_state(opened, self._benched(row.round_id, opened.expected))
        for shard_id, participant_id, arrived, late in self.store.received(row.round_id):
            if late:
                state.late.setdefault(participant_id, set()).add(shard_id)
            else:
                state.record(shard_id, participant_id, arrived)
        for participant_id, _ in self.store.adapters(row.round_id):
            state.record(FEDAVG_SHARD, participant_id, row.opened_unix)
        for closing in self.store.closings(row.round_id):
            state.restore_closing(closing.shard_id, closing.status, closing.answered, closing.reason)
        self.round = state
        self._pending_announcement = None if row.announced else row
        log.info("round_resumed", round=row.round_id, closings=len(self.store.closings(row.round_id)))

    async def _resume_announcement(self) -> None:
        """A crash between storing a round and announcing it: announce it now."""
        row = self._pending_announcement
        if row is not None:
            opened = decode_reply(row.announcement)
            await self._announce(row.round_id, row.announcement, opened.message_id, row.expected)
            self._pending_announcement = None

    # -- intake ------------------------------------------------------------

    def _intake(self, owner: str | None) -> Handler:
        """The handler of `owner`'s intake queue (None: the lobby); it dispatches on the routing key."""

        async def handle(delivery: Delivery) -> None:
            key = delivery.routing_key
            if owner is None and key.startswith("ctl.") and key[4:] in self._consumed:
                await delivery.ack()  # the lobby's copy of what the sender's intake queue delivers
                return
            if key.startswith("gen."):
                await self._on_generation(delivery, owner)
            elif key.startswith("ctl."):
                await self._on_control(delivery, owner)
            else:
                await self._reject(
                    delivery, f"routing key {key!r} is neither gen.<shard>.<pid> nor ctl.<pid>"
                )

        return handle

    async def _decode(self, decode: Callable[[bytes], DecodedT], body: bytes) -> DecodedT:
        if len(body) > OFF_LOOP_DECODE_BYTES:
            return await asyncio.to_thread(decode, body)
        return decode(body)

    async def _on_generation(self, delivery: Delivery, owner: str | None) -> None:
        try:
            batch = await self._decode(decode_generation, delivery.body)
        except SchemaError as e:
            await self._reject(delivery, f"schema {e}")
            return
        problem = (
            identity_problem(delivery, batch, self.settings.federation)
            or ownership_problem(batch, owner)
            or self._batch_problem(delivery, batch)
        )
        if problem is not None:
            if self._already_stored(batch):  # a recovery's republish after its round closed
                await self._ack_duplicate(delivery)
            else:
                await self._reject(delivery, problem, batch)
            return
        state = self.round
        assert state is not None  # _batch_problem ensures an open round
        acceptance = state.classify(batch.shard_id, batch.participant_id)
        if acceptance in (Acceptance.UNKNOWN_SHARD, Acceptance.NOT_EXPECTED):
            await self._reject(
                delivery, f"{acceptance.value}: shard {batch.shard_id} of round {batch.round_id}", batch
            )
            return
        if acceptance is Acceptance.DUPLICATE:
            await self._ack_duplicate(delivery)
            return
        late = acceptance is Acceptance.LATE
        new = NewBatch(
            batch.message_id,
            batch.round_id,
            batch.shard_id,
            batch.participant_id,
            self.clock(),
            late,
            delivery.body,
        )
        # Classified and queued for the commit in one step (no await between): the driver commits every
        # pending write before it closes shards, so none is classified open and recorded closed.
        stored = await self._group_commit(new, state)
        if stored is Stored.CONFLICT:
            slot = self.store.batch_slot(batch.participant_id, batch.message_id)
            await self._reject(
                delivery, f"message_id {batch.message_id!r} was already used for {slot}", batch
            )
            return
        # Only once the transaction holding the batch has committed. The whole group wakes in one event-loop
        # turn, so AmqpTransport writes its acks as one basic.ack(multiple=True) where that is safe.
        await delivery.ack()
        if stored is Stored.DUPLICATE:
            self.counters.duplicates += 1
        elif late:
            self.counters.late += 1
            log.info(
                "late_batch", round=batch.round_id, shard=batch.shard_id, participant=batch.participant_id
            )
        else:
            self.counters.accepted += 1
            self._wake.set()

    def _already_stored(self, batch: GenerationBatch) -> bool:
        """Whether this sender's batch with this id is stored for the same round and shard."""
        return self.store.batch_slot(batch.participant_id, batch.message_id) == (
            batch.round_id,
            batch.shard_id,
        )

    async def _ack_duplicate(self, delivery: Delivery) -> None:
        await delivery.ack()
        self.counters.duplicates += 1

    async def _group_commit(self, write: NewBatch, state: RoundState) -> Stored:
        """Store `write` (and touch its sender) in one SQLite transaction with the other intake writes
        of this event-loop turn, and record it in `state` only if it was stored.

        Returns its outcome once that transaction has committed (one fsync for the whole group rather
        than two per batch); raises, and so leaves the delivery unacked, if the transaction failed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Stored] = loop.create_future()
        self._pending_writes.append(PendingWrite(write, state, future))
        if len(self._pending_writes) == 1 and self._committing is None:
            loop.call_later(GROUP_COMMIT_PAUSE, self._commit_pending_writes, 1, loop.time())
        return await future

    def _commit_pending_writes(self, seen: int, since: float) -> None:
        # While deliveries keep joining the group, wait a little longer (up to GROUP_COMMIT_WAIT in all);
        # then commit them all at once. An fsync costs milliseconds, far more than a delivery.
        if self._committing is not None or not self._pending_writes:
            return  # a commit under way takes the pending writes next, when it ends
        loop = asyncio.get_running_loop()
        count = len(self._pending_writes)
        if count > seen and count < GROUP_COMMIT_MAX and loop.time() - since < GROUP_COMMIT_WAIT:
            loop.call_later(GROUP_COMMIT_PAUSE, self._commit_pending_writes, count, since)
            return
        self._start_commit()

    def _start_commit(self) -> asyncio.Task[None]:
        group, self._pending_writes = self._pending_writes, []
        self._committing = asyncio.get_running_loop().create_task(self._commit(group))
        return self._committing

    async def _commit(self, group: list[PendingWrite]) -> None:
        """Commit `group` in a worker thread, so that its fsync does not stall the event loop (which
        meanwhile takes more deliveries: they form the next group, committed as soon as this one is).
        A stored batch counts as an answer from here on, and only a stored one."""
        try:
            results = await asyncio.to_thread(self.store.add_batches, [pending.write for pending in group])
        except asyncio.CancelledError:
            for pending in group:
                pending.future.cancel()
            raise
        except Exception as e:  # every write of the group rolled back: none of them is acked
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(e)
        else:
            for pending, result in zip(group, results, strict=True):
                write = pending.write
                if result is Stored.STORED:
                    pending.state.record(write.shard_id, write.participant_id, write.received_unix)
                if not pending.future.done():
                    pending.future.set_result(result)
        self._committing = None
        if self._pending_writes:
            self._start_commit()

    async def _commit_intake(self) -> None:
        """Commit every pending intake write now, and wait until nothing is pending or committing."""
        while self._committing is not None or self._pending_writes:
            await asyncio.shield(self._committing or self._start_commit())

    def _batch_problem(self, delivery: Delivery, batch: GenerationBatch) -> str | None:
        if shard_of_routing_key(delivery.routing_key) != batch.shard_id:
            return f"routing key {delivery.routing_key!r} does not match shard_id {batch.shard_id}"
        state = self.round
        if state is None or batch.round_id != state.round_id:
            current = "none" if state is None else str(state.round_id)
            return f"round {batch.round_id} is not open (open round: {current})"
        shard = state.shards.get(batch.shard_id)
        if shard is None:
            return f"unknown_shard: round {batch.round_id} has no shard {batch.shard_id}"
        asked = set(shard.prompt_ids)
        given = [a.prompt_id for a in batch.answers]
        if len(set(given)) != len(given):
            return "answers repeat a prompt_id"
        unknown = set(given) - asked
        if unknown:
            return f"answers name prompts not in shard {batch.shard_id}: {sorted(unknown)[:3]}"
        return None

    def _decode_control(self, body: bytes) -> Message:
        if self.settings.strategy != "fedavg" and len(body) > MAX_SMALL_CONTROL_BYTES:
            # Only an adapter may be larger, and this federation takes none: refused unread.
            raise SchemaError(
                "too_large",
                f"body is {len(body)} bytes, limit {MAX_SMALL_CONTROL_BYTES} for control messages "
                "(adapter updates are only taken in a fedavg federation)",
            )
        return decode_control(body)

    async def _on_control(self, delivery: Delivery, owner: str | None) -> None:
        try:
            message = await self._decode(self._decode_control, delivery.body)
        except SchemaError as e:
            await self._reject(delivery, f"schema {e}")
            return
        problem = identity_problem(delivery, message, self.settings.federation) or ownership_problem(
            message, owner
        )
        if problem is not None:
            await self._reject(delivery, problem, message)
            return
        now = self.clock()
        pid = message.participant_id
        if isinstance(message, Join):
            # Stored first, so that a round opening meanwhile counts it; its queues before the ack.
            self.store.upsert_member(pid, message.model_id, message.can_train, now)
            await self._declare_participants([pid])
            log.info("member_joined", participant=pid, model=message.model_id, round=message.round_id)
            self._wake.set()
        elif isinstance(message, Heartbeat):
            self._touch(pid, now)
        elif isinstance(message, ParticipantReport):
            if not self.store.add_report(message.message_id, message.round_id, pid, dict(message.metrics)):
                self.counters.duplicates += 1
            self._touch(pid, now)
        elif isinstance(message, AdapterUpdate):
            problem = await self._take_adapter(message, delivery.body, now)
            if problem is not None:
                await self._reject(delivery, problem, message)
                return
        await delivery.ack()

    def _touch(self, participant_id: str, now: float) -> None:
        # A write (and an fsync) per heartbeat would let one member's heartbeat flood busy the event loop.
        if now - self._touched.get(participant_id, float("-inf")) >= TOUCH_INTERVAL_SECONDS:
            self.store.touch_member(participant_id, now)
            self._touched[participant_id] = now

    async def _take_adapter(self, update: AdapterUpdate, body: bytes, now: float) -> str | None:
        state = self.round
        if self.settings.strategy != "fedavg":
            return "adapter updates are only taken in a fedavg federation"
        if state is None or update.round_id != state.round_id:
            return f"round {update.round_id} is not open"
        try:
            shapes = {k: tuple(v.shape) for k, v in tensors_from_wire(update.tensors).items()}
        except ChorusError as e:
            return f"bad adapter tensors: {e}"
        expected_shapes = self._adapter_shapes(state.round_id)
        if expected_shapes is not None and shapes != expected_shapes:
            return "adapter tensors differ in names or shapes from those already received this round"
        acceptance = state.classify(FEDAVG_SHARD, update.participant_id)
        if acceptance is Acceptance.NOT_EXPECTED:
            return f"not_expected: participant {update.participant_id!r} is not in round {update.round_id}"
        if acceptance is Acceptance.LATE:
            state.record(FEDAVG_SHARD, update.participant_id, now)  # listed as late, not used
        elif acceptance is Acceptance.ACCEPTED and self.store.add_adapter(
            update.message_id, update.round_id, update.participant_id, body
        ):
            state.record(FEDAVG_SHARD, update.participant_id, now)  # an answer only once it is stored
            self._wake.set()
        else:
            self.counters.duplicates += 1
        return None

    def _adapter_shapes(self, round_id: int) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes of the first adapter stored this round, which every other must match."""
        stored = self.store.adapters(round_id)
        if not stored:
            return None
        first = decode_control(stored[0][1])
        assert isinstance(first, AdapterUpdate)
        return {t.name: tuple(t.shape) for t in first.tensors}

    async def _reject(self, delivery: Delivery, reason: str, message: Message | None = None) -> None:
        self.counters.reject(reason)
        log.warning(
            "rejected",
            reason=reason,
            round=None if message is None else message.round_id,
            shard=getattr(message, "shard_id", None),
            participant=None if message is None else message.participant_id,
            user_id=delivery.user_id,
            routing_key=delivery.routing_key,
        )
        await delivery.dead_letter(reason[:1024])

    async def _declare_participants(self, participant_ids: Sequence[str]) -> None:
        """Declare these participants' queues, once each, and take their intake if it is running."""
        new = sorted({p for p in participant_ids if p not in self._declared_participants})
        if not new:
            return
        self._declared_participants.update(new)  # before the awaits: a concurrent Join does not repeat it
        try:
            await self.transport.declare(participant_topology(new).merged(intake_topology(new)))
            if self._intake_open:
                await self._consume_intake(new)
        except BaseException:
            self._declared_participants.difference_update(new)
            raise


@dataclass(frozen=True)
class PendingWrite:
    """An intake write waiting for its group commit, the round state it counts in, and its caller."""

    write: NewBatch
    state: RoundState
    future: asyncio.Future[Stored]


def decode_summary(body: bytes) -> RoundClosed:
    message = decode_reply(body)
    assert isinstance(message, RoundClosed)
    return message


def mean_agreement(per_shard: Sequence[dict[str, float]]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for agreement in per_shard:
        for participant_id, value in agreement.items():
            totals.setdefault(participant_id, []).append(value)
    return {p: round(sum(v) / len(v), 6) for p, v in sorted(totals.items())}
