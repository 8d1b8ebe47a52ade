"""Intake: everything participants send, from their intake queues and the lobby, checked and stored.

Each member's traffic waits in its own intake queue (a bulkhead: a flood fills only the flooder's
queue); the lobby holds what comes from participants that have none yet, and a copy of all control
traffic. The lobby is shared, so another member's flood can push a newcomer's Join out of it: any
control message from a sender whose intake queue is not consumed yet (a heartbeat, a re-sent Join)
makes the coordinator consume that queue, where the sender's own copy of its Join waits, out of
everyone else's reach; copies that are not read (the lobby's, once the sender's queue is consumed) are
acked unread, and recorded cut. Handlers decode (large bodies off the event loop), check
identity and ownership, validate, persist, then ack: they never wait for other participants, so no
delivery is held unacked across a round. Generation batches are stored by group commit: one SQLite
transaction (and fsync) for all the batches of an event-loop turn, in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from broker.errors import BrokerError
from broker.recorder import ack_unread
from broker.topology import LOBBY_MAX_MESSAGES, LOBBY_QUEUE, intake_queue
from broker.transport import Delivery, Handler, Subscription, Transport
from common.log_budget import LogBudget
from coordinator.identity import identity_problem, ownership_problem, shard_of_routing_key
from coordinator.late_answers import RevisionWindow
from coordinator.rounds import Acceptance, RoundState
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore, NewBatch, Stored
from coordinator.strategies.base import RoundStrategy
from schemas.codec import (
    CONTROL_MESSAGES,
    MAX_ADAPTER_BODY_BYTES,
    MAX_SMALL_CONTROL_BYTES,
    Codec,
    decode_generation,
)
from schemas.errors import SchemaError
from schemas.messages import AdapterUpdate, GenerationBatch, Heartbeat, Join, Message, ParticipantReport

log = structlog.get_logger(__name__)
DecodedT = TypeVar("DecodedT")

# Group commit of intake writes: the group closes once no write joined it for GROUP_COMMIT_PAUSE seconds,
# after GROUP_COMMIT_WAIT seconds in all, or at GROUP_COMMIT_MAX writes.
GROUP_COMMIT_PAUSE = 0.001
GROUP_COMMIT_WAIT = 0.01
GROUP_COMMIT_MAX = 1024
# Bodies larger than this are decoded in a worker thread, so that a large (or hostile) one does not
# stall every other member's intake on the event loop.
OFF_LOOP_DECODE_BYTES = 64 * 1024
# Control messages judged from the lobby that are remembered, so that their intake-queue copies are not
# judged again (the lobby holds at most this many messages anyway).
LOBBY_JUDGED_MEMORY = LOBBY_MAX_MESSAGES
# A member's last-seen time is written at most this often; more heartbeats than that change nothing.
TOUCH_INTERVAL_SECONDS = 1.0
# What a Join or a Heartbeat may weigh: at its field limits one takes under 2 KiB (ids of 4-byte code
# points), so this leaves room for fields added later; a larger one (a padded flood) is refused unread.
MAX_PRESENCE_BYTES = 4096
# Control bodies by kind, checked from the `kind` alone before a body is decoded (PROTOCOL.md §8.3).
CONTROL_BODY_LIMITS = {
    "join": MAX_PRESENCE_BYTES,
    "heartbeat": MAX_PRESENCE_BYTES,
    "participant_report": MAX_SMALL_CONTROL_BYTES,
}
_control_codec: Codec[Message] = Codec(
    CONTROL_MESSAGES, max_body_bytes=MAX_ADAPTER_BODY_BYTES, kind_limits=CONTROL_BODY_LIMITS
)
# Why an answer of the wrong kind for this federation's strategy is refused (PROTOCOL.md §8.1).
REFUSED_ANSWERS = {
    AdapterUpdate: "adapter updates are only taken in a fedavg federation",
    GenerationBatch: "generation batches are not taken in a federation answered by adapters",
}


def _remember(memory: OrderedDict[tuple[str, str], None], key: tuple[str, str]) -> None:
    memory[key] = None
    while len(memory) > LOBBY_JUDGED_MEMORY:
        memory.popitem(last=False)


def _forget(memory: OrderedDict[tuple[str, str], None], key: tuple[str, str]) -> bool:
    """Whether `key` was remembered (it no longer is)."""
    return memory.pop(key, False) is None


@dataclass
class Counters:
    """What intake did, for status lines and tests."""

    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    received_bytes: int = 0  # body bytes of every delivery handled, whatever became of it
    sidelined: list[tuple[int, str]] = field(default_factory=list)  # (round, member) as each was sidelined

    def reject(self, reason: str) -> None:
        self.dead_lettered += 1
        key = reason.split(":")[0].split(" ")[0]
        self.rejections[key] = self.rejections.get(key, 0) + 1


@dataclass(frozen=True)
class PendingWrite:
    """An intake write waiting for its group commit, the round state it counts in, and its caller."""

    write: NewBatch
    state: RoundState
    future: asyncio.Future[Stored]


class Intake:
    """Consumes the lobby and members' intake queues; judges and stores what arrives.

    `current_round()` gives the open round's state (None between rounds), `on_join(pid)` makes a new
    member's queues exist (and calls `consume` for its intake queue; it is also called for a sender
    whose other control messages come through the lobby first), `wake()` tells the driver that
    something it waits for arrived.
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        transport: Transport,
        store: CoordinatorStore,
        strategy: RoundStrategy,
        *,
        clock: Callable[[], float],
        current_round: Callable[[], RoundState | None],
        on_join: Callable[[str], Awaitable[None]],
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.store = store
        self.strategy = strategy
        self.clock = clock
        self.current_round = current_round
        self.on_join = on_join
        self.wake = wake
        self.counters = Counters()
        self._rejected_log = LogBudget(log)
        self.is_open = False
        self._subscriptions: list[Subscription] = []
        self._consumed: set[str] = set()  # participants whose intake queue this coordinator consumes
        self._touched: dict[str, float] = {}  # member -> when its last-seen time was last written
        # (sender, message id) of control messages judged from the lobby before the sender's intake
        # queue was consumed: that queue's copy of each is acked unread.
        self._judged_in_lobby: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Senders consumed on word from the lobby whose lobby copies may have no twin yet, and what their
        # intake queue judged meanwhile (see _other_copy_judged).
        self._untwinned: set[str] = set()
        self._judged_in_intake: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pending_writes: list[PendingWrite] = []
        self._committing: asyncio.Task[None] | None = None
        self._revision_window = RevisionWindow(store) if settings.round.late_policy == "revise" else None

    # -- consuming ---------------------------------------------------------

    async def open(self, members: Sequence[str]) -> None:
        self.is_open = True
        await self.consume([None, *members])

    async def consume(self, owners: Sequence[str | None]) -> None:
        """Subscribe to these participants' intake queues (None: the lobby), concurrently: each consumer
        costs a few broker round trips, and one after another they would hold back intake."""
        prefetch = self.settings.prefetch
        self._consumed.update(o for o in owners if o is not None)
        outcomes = await asyncio.gather(
            *(
                self.transport.consume(
                    LOBBY_QUEUE if owner is None else intake_queue(owner),
                    self._handler(owner),
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

    async def close(self) -> None:
        self.is_open = False
        self._consumed.clear()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                await subscription.cancel()
            except BrokerError as e:
                log.warning("cancel_failed", error=str(e))

    def _handler(self, owner: str | None) -> Handler:
        """The handler of `owner`'s intake queue (None: the lobby); it dispatches on the routing key."""

        async def handle(delivery: Delivery) -> None:
            self.counters.received_bytes += len(delivery.body)
            key = delivery.routing_key
            if key.startswith("ctl.") and self._other_copy_judged(owner, key[4:], delivery.message_id):
                await ack_unread(delivery)
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

    def _other_copy_judged(self, owner: str | None, sender: str, message_id: str | None) -> bool:
        """Whether this control message's other copy (lobby / intake queue) is judged or will be.

        Control traffic reaches both the lobby and the sender's intake queue. Once that queue is
        consumed, it judges; the lobby's copies are acked unread. A copy the lobby judged before then
        is remembered, so the intake queue's copy of the same message is not judged a second time.
        A sender whose queue was consumed when the lobby brought word of it may have copies in the
        lobby from before that queue existed, with no twin: its lobby copies are judged too (each
        message once, from whichever copy comes first) until one is seen to have a twin. The lobby
        delivers in order, so every later copy has one.
        """
        if owner is None:
            if sender in self._consumed and sender not in self._untwinned:
                return True
            if message_id is None:
                return False
            if sender in self._untwinned and _forget(self._judged_in_intake, (sender, message_id)):
                self._untwinned.discard(sender)
                return True
            _remember(self._judged_in_lobby, (sender, message_id))
            return False
        if message_id is None:
            return False
        if _forget(self._judged_in_lobby, (owner, message_id)):
            self._untwinned.discard(owner)
            return True
        if owner in self._untwinned:
            _remember(self._judged_in_intake, (owner, message_id))
        return False

    async def _decode(self, decode: Callable[[bytes], DecodedT], body: bytes) -> DecodedT:
        if len(body) > OFF_LOOP_DECODE_BYTES:
            return await asyncio.to_thread(decode, body)
        return decode(body)

    # -- generation batches --------------------------------------------------

    async def _on_generation(self, delivery: Delivery, owner: str | None) -> None:
        try:
            batch = await self._decode(decode_generation, delivery.body)
        except SchemaError as e:
            await self._reject(delivery, f"schema {e}")
            return
        problem = (
            identity_problem(delivery, batch, self.settings.federation)
            or ownership_problem(batch, owner)
            or self._kind_problem(batch)
        )
        if problem is not None:  # never the sender's own stored batch: no store read for these
            await self._reject(delivery, problem, batch)
            return
        problem = self._batch_problem(delivery, batch)
        if problem is not None:
            if self._already_stored(batch):  # a recovery's republish after its round closed
                await self._ack_duplicate(delivery)
            elif self._revises_previous_round(delivery, batch):
                await self._store_late_answer(delivery, batch)
            elif self._revision_window is not None and self._revision_window.holds(batch):
                await self._ack_duplicate(delivery)  # its slot has a late batch already (§6.5)
            else:
                await self._reject(delivery, problem, batch)
            return
        state = self.current_round()
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
        new = self._new_batch(delivery, batch, late)
        # Classified and queued for the commit in one step (no await between): the driver commits every
        # pending write before it closes shards, so none is classified open and recorded closed.
        stored = await self._group_commit(new, state)
        # Settled only once the transaction holding the batch has committed. The whole group wakes in one
        # event-loop turn, so AmqpTransport writes its acks as one basic.ack(multiple=True) where safe.
        await self._settle_stored(delivery, batch, stored, late)

    async def _settle_stored(
        self,
        delivery: Delivery,
        batch: GenerationBatch,
        stored: Stored,
        late: bool,
        event: str = "late_batch",
    ) -> None:
        if stored is Stored.CONFLICT:
            await self._reject_reused_id(delivery, batch)
            return
        await delivery.ack()
        if stored is Stored.DUPLICATE:
            self.counters.duplicates += 1
        elif late:
            self.counters.late += 1
            log.info(event, round=batch.round_id, shard=batch.shard_id, participant=batch.participant_id)
        else:
            self.counters.accepted += 1
            self.wake()

    def _revises_previous_round(self, delivery: Delivery, batch: GenerationBatch) -> bool:
        if self._revision_window is None:
            return False
        state = self.current_round()
        return self._revision_window.admits(delivery, batch, None if state is None else state.round_id)

    async def _store_late_answer(self, delivery: Delivery, batch: GenerationBatch) -> None:
        """A straggler's batch for the previous round: stored late, for that round's label revision."""
        (stored,) = self.store.add_batches([self._new_batch(delivery, batch, late=True)])
        if stored is not Stored.CONFLICT and self._revision_window is not None:
            self._revision_window.taken(batch)
        await self._settle_stored(delivery, batch, stored, late=True, event="late_batch_for_revision")

    def _new_batch(self, delivery: Delivery, batch: GenerationBatch, late: bool) -> NewBatch:
        return NewBatch(
            batch.message_id,
            batch.round_id,
            batch.shard_id,
            batch.participant_id,
            self.clock(),
            late,
            delivery.body,
        )

    async def _reject_reused_id(self, delivery: Delivery, batch: GenerationBatch) -> None:
        slot = self.store.batch_slot(batch.participant_id, batch.message_id)
        await self._reject(delivery, f"message_id {batch.message_id!r} was already used for {slot}", batch)

    def _kind_problem(self, answer: GenerationBatch | AdapterUpdate) -> str | None:
        if isinstance(answer, self.strategy.answers.kind):
            return None
        return REFUSED_ANSWERS[type(answer)]

    def _batch_problem(self, delivery: Delivery, batch: GenerationBatch) -> str | None:
        if shard_of_routing_key(delivery.routing_key) != batch.shard_id:
            return f"routing key {delivery.routing_key!r} does not match shard_id {batch.shard_id}"
        state = self.current_round()
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
        return self.strategy.answer_problem(batch.round_id, batch)

    def _already_stored(self, batch: GenerationBatch) -> bool:
        """Whether this sender's batch with this id is stored for the same round and shard."""
        slot = self.store.batch_slot(batch.participant_id, batch.message_id)
        return slot == (batch.round_id, batch.shard_id)

    async def _ack_duplicate(self, delivery: Delivery) -> None:
        await delivery.ack()
        self.counters.duplicates += 1

    # -- group commit --------------------------------------------------------

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

    async def commit_pending(self) -> None:
        """Commit every pending intake write now, and wait until nothing is pending or committing."""
        while self._committing is not None or self._pending_writes:
            await asyncio.shield(self._committing or self._start_commit())

    # -- control messages ----------------------------------------------------

    def _decode_control(self, body: bytes) -> Message:
        limit = self.strategy.answers.max_control_bytes
        if len(body) > limit and limit < _control_codec.max_body_bytes:
            # Only an adapter may be larger, and this federation's strategy takes none: refused unread.
            raise SchemaError(
                "too_large",
                f"body is {len(body)} bytes, limit {limit} for control messages "
                f"({REFUSED_ANSWERS[AdapterUpdate]})",
            )
        return _control_codec.decode(body)

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
        if owner is None and pid not in self._consumed:
            self._untwinned.add(pid)
            if not isinstance(message, Join):
                # Its Join may have been pushed out of the shared lobby by another member's flood; the
                # copy in its own intake queue is still there, and is read once that queue is consumed.
                await self.on_join(pid)
        if isinstance(message, Join):
            # Stored first, so that a round opening meanwhile counts it; its queues before the ack.
            self.store.upsert_member(pid, message.model_id, message.can_train, now)
            await self.on_join(pid)
            log.info("member_joined", participant=pid, model=message.model_id, round=message.round_id)
            self.wake()
        elif isinstance(message, Heartbeat):
            self._touch(pid, now)
        elif isinstance(message, ParticipantReport):
            if not self.store.add_report(message.message_id, message.round_id, pid, dict(message.metrics)):
                self.counters.duplicates += 1
            self._touch(pid, now)
            self.wake()  # the driver may be waiting for the last round's reports
        elif isinstance(message, AdapterUpdate):
            problem = self._take_adapter(message, delivery.body, now)
            if problem is not None:
                await self._reject(delivery, problem, message)
                return
        await delivery.ack()

    def _touch(self, participant_id: str, now: float) -> None:
        # A write (and an fsync) per heartbeat would let one member's heartbeat flood busy the event loop.
        if now - self._touched.get(participant_id, float("-inf")) >= TOUCH_INTERVAL_SECONDS:
            self.store.touch_member(participant_id, now)
            self._touched[participant_id] = now

    def _take_adapter(self, update: AdapterUpdate, body: bytes, now: float) -> str | None:
        kind = self._kind_problem(update)
        if kind is not None:
            return kind
        state = self.current_round()
        if state is None or update.round_id != state.round_id:
            return f"round {update.round_id} is not open"
        problem = self.strategy.answer_problem(update.round_id, update)
        if problem is not None:
            return problem
        (shard_id,) = state.shards  # an adapter answers the round's one shard
        acceptance = state.classify(shard_id, update.participant_id)
        if acceptance is Acceptance.NOT_EXPECTED:
            return f"not_expected: participant {update.participant_id!r} is not in round {update.round_id}"
        if acceptance is Acceptance.LATE:
            state.record(shard_id, update.participant_id, now)  # listed as late, not used
            return None
        stored = Stored.DUPLICATE
        if acceptance is Acceptance.ACCEPTED:
            # Stored with the batches (one table of answers), so a restart finds it like any answer.
            new = NewBatch(
                update.message_id, update.round_id, shard_id, update.participant_id, now, False, body
            )
            (stored,) = self.store.add_batches([new])
        if stored is Stored.STORED:
            state.record(shard_id, update.participant_id, now)  # an answer only once it is stored
            self.wake()
        else:
            self.counters.duplicates += 1
        return None

    async def _reject(self, delivery: Delivery, reason: str, message: Message | None = None) -> None:
        self.counters.reject(reason)
        # At most a few lines per sender and minute: a flood of bad messages must not write the log at
        # the flooder's bandwidth (the counters and metrics still count every one).
        self._rejected_log.warning(
            "rejected",
            sender=delivery.user_id,
            reason=reason,
            round=None if message is None else message.round_id,
            shard=getattr(message, "shard_id", None),
            participant=None if message is None else message.participant_id,
            user_id=delivery.user_id,
            routing_key=delivery.routing_key,
        )
        await delivery.dead_letter(reason[:1024])
