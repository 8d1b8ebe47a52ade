"""The coordinator service: lifecycle, the round driver, and restart.

A single driver task opens rounds, closes shards when the round engine says so, has the strategy
decide them, stores the decisions and has the outbox send their replies. Intake (coordinator.intake)
stores what participants send as it arrives; the strategy (coordinator.strategies) is all that
differs between a semantic, a majority and a FedAvg federation, and it only decides. Every decision is
in SQLite before it is acted on, so a restarted coordinator resumes the open round and re-sends
exactly what it had decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import structlog

from broker.topology import COORDINATOR_USER, core_topology
from broker.transport import Transport
from common.embedding import Embedder
from coordinator import stored
from coordinator.decisions import Decision, Outgoing
from coordinator.intake import Counters, Intake
from coordinator.metrics import CoordinatorMetrics
from coordinator.outbox import Outbox
from coordinator.prompts import PublicPrompt, load_prompts
from coordinator.rounds import RoundState, ShardClosing, resolve_quorum
from coordinator.settings import CoordinatorSettings
from coordinator.sidelining import sidelined_in
from coordinator.store import CoordinatorStore, RoundRow
from coordinator.strategies import build_round_strategy, check_strategy_name
from coordinator.strategies.base import RoundStrategy
from schemas.codec import encode
from schemas.ids import round_closed_id, round_opened_id
from schemas.messages import RoundClosed, RoundOpened, ShardOutcome

log = structlog.get_logger(__name__)


class Coordinator:
    def __init__(
        self,
        settings: CoordinatorSettings,
        transport: Transport,
        store: CoordinatorStore,
        strategy: RoundStrategy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.store = store
        self.strategy = strategy
        self.clock = clock
        self.round: RoundState | None = None
        self.closed_rounds: list[RoundClosed] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._decide_seconds = 0.0
        self._pending_announcement: RoundRow | None = None
        self.outbox = Outbox(settings, transport, store, self._take_intake_of)
        self.intake = Intake(
            settings,
            transport,
            store,
            strategy,
            clock=clock,
            current_round=lambda: self.round,
            on_join=lambda pid: self.outbox.declare_participants([pid]),
            wake=self._arrived,
        )
        self.metrics = CoordinatorMetrics(lambda: self.intake.counters, lambda: self.outbox.published_bytes)
        strategy.time_parts(self.metrics.observe_part)

    @property
    def counters(self) -> Counters:
        return self.intake.counters

    @property
    def transport(self) -> Transport:
        return self._transport

    @transport.setter
    def transport(self, transport: Transport) -> None:
        """Replace the transport before `start()` (tests wrap it to record or to fail on cue)."""
        self._transport = transport
        if hasattr(self, "intake"):
            self.intake.transport = self.outbox.transport = transport

    # -- lifecycle ---------------------------------------------------------

    def request_stop(self) -> None:
        """Stop intake and return from `run()` after the current step (SIGTERM)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Start, run every round, wait (bounded) for the last round's reports, stop intake."""
        await self.start()
        try:
            await self.drive()
            await self.collect_final_reports()
        finally:
            await self.stop_intake()

    async def collect_final_reports(self) -> None:
        """Keep taking intake until everyone counted in the last round has reported it, or
        `round.final_reports_seconds` passed: otherwise the last reports would stay unread."""
        if not self.closed_rounds or not self.closed_rounds[-1].final:
            return
        last = self.closed_rounds[-1]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.round.final_reports_seconds
        while not self._stopping.is_set():
            self._wake.clear()
            reported = {p for _, p, _ in self.store.reports(last.round_id)}
            waiting = sorted(set(last.answered) - reported)
            if not waiting or loop.time() >= deadline:
                log.info("final_reports", round=last.round_id, reported=len(reported), missing=waiting)
                return
            await self._sleep_until_woken(deadline - loop.time())

    async def start(self) -> None:
        # Metrics first: a port already taken fails before any intake is consumed.
        await self.metrics.serve(
            self.settings.metrics,
            self.transport.is_connected,
            self._health_facts,
            service="coordinator",
        )
        try:
            await self.transport.declare(core_topology())
            members = [m.participant_id for m in self.store.members()]
            await self.outbox.declare_participants([*self.settings.roster, *members])
            self._restore()
            await self._resume_announcement()
            await self.intake.open(sorted(self.outbox.declared))
        except BaseException:
            await self.metrics.stop_serving()
            raise

    def _health_facts(self) -> Mapping[str, object]:
        # Called from the metrics server's thread: plain attributes only.
        return self.metrics.health_facts(self.round, len(self.closed_rounds))

    def _arrived(self) -> None:
        """Intake stored something the driver may wait for (a batch, a join, a report)."""
        self.metrics.progress.mark()
        self._wake.set()

    async def _take_intake_of(self, participant_ids: Sequence[str]) -> None:
        if self.intake.is_open:
            await self.intake.consume(participant_ids)

    async def stop_intake(self) -> None:
        """Stop taking intake, then stop serving metrics."""
        try:
            await self.intake.close()
        finally:
            await self.metrics.stop_serving()

    async def drive(self) -> None:
        """Run rounds until the configured number is done or a stop is requested."""
        wanted = self.settings.round.rounds
        while not self._stopping.is_set():
            # Cleared before the state is read, never after: a wake-up that comes while a step awaits
            # (publishing labels, say) must end the sleep that follows it.
            self._wake.clear()
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
        self.metrics.members.set(len(active))
        if len(active) < settings.min_participants:
            await self._sleep_until_woken(1.0)
            return False
        round_id = self.store.last_round_id() + 1
        sidelined = self._sidelined(round_id, active)
        quorum = resolve_quorum(settings.quorum, len(active) - len(sidelined))
        now = self.clock()
        opened = RoundOpened(
            federation=self.settings.federation,
            round_id=round_id,
            message_id=round_opened_id(self.settings.federation, round_id),
            participant_id=COORDINATOR_USER,
            strategy=self.strategy.announces,
            shards=self.strategy.shards(round_id),
            generation=self.settings.generation,
            expected=sorted(active),
            quorum=quorum,
            deadline_unix=now + settings.deadline_seconds,
            opened_unix=now,
            run_id=self.store.run_id,  # a participant tells a re-run (a new state) from a restart by it
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
        self.round = self._round_state(opened, sidelined)
        self.metrics.round_opened(round_id, len(sidelined))
        self._report_sidelining(round_id, sidelined, active)
        await self._announce(round_id, opened.message_id, body, active)
        log.info(
            "round_opened",
            round=round_id,
            participants=len(active),
            quorum=quorum,
            shards=len(opened.shards),
            sidelined=sorted(sidelined),
        )
        return True

    def _sidelined(self, round_id: int, members: Sequence[str]) -> set[str]:
        """Members that left a shard unanswered, in time and late, in each of the last
        `sideline_after_missed_rounds` rounds (`RoundClosed.missing`): still asked, no longer waited for,
        until they answer every shard of a round again. Never all of them (coordinator.sidelining, which
        the strategy's revisions ask too)."""
        return sidelined_in(self.store, round_id, members, self.settings.round.sideline_after_missed_rounds)

    def _report_sidelining(self, round_id: int, sidelined: set[str], members: Sequence[str]) -> None:
        before = self._sidelined(round_id - 1, self.store.expected(round_id - 1)) if round_id > 1 else set()
        for member in sorted(sidelined - before):
            self.counters.sidelined.append((round_id, member))
            log.warning(
                "member_sidelined",
                round=round_id,
                participant=member,
                missed_rounds=self.settings.round.sideline_after_missed_rounds,
                hint="asked but not waited for until it answers every shard of a round again",
            )
        for member in sorted((before - sidelined) & set(members)):
            log.info("member_returned", round=round_id, participant=member)

    def _round_state(self, opened: RoundOpened, sidelined: set[str]) -> RoundState:
        return RoundState(
            round_id=opened.round_id,
            shards=self.strategy.answer_slots(opened.shards),
            expected=opened.expected,
            quorum=opened.quorum,
            opened_at=opened.opened_unix,
            deadline_at=opened.deadline_unix,
            grace_seconds=self.settings.round.grace_seconds,
            sidelined=sidelined,
            straggler_factor=self.settings.round.straggler_factor,
        )

    async def _announce(self, round_id: int, message_id: str, body: bytes, recipients: Sequence[str]) -> None:
        await self.outbox.announce(round_id, message_id, body, recipients, "round_opened")
        self.store.mark_announced(round_id)

    async def _advance_round(self) -> None:
        state = self.round
        assert state is not None
        # A shard must not close over a batch that intake has not committed yet, so commit first.
        await self.intake.commit_pending()
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
        """Sleep `delay` seconds or until a wake-up since the caller last cleared `_wake`."""
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay)

    # -- closing shards ----------------------------------------------------

    async def _close_shards(self, state: RoundState, closings: Sequence[ShardClosing]) -> None:
        """Close every shard that became due together: one transaction per step, not one per shard.

        Shards that stop taking answers at the same time (typically many, at the end of intake) have
        their frozen answer sets stored in one transaction, are decided together in a worker thread
        (the event loop keeps taking deliveries meanwhile), and their replies are published all at
        once, so closing twenty shards costs about what closing one did.
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
        if any(closing.status == "labelled" for closing in closings):
            started = time.perf_counter()
            replies = await self._decide(state, closings)
            decide_seconds = time.perf_counter() - started
            self._decide_seconds += decide_seconds
            self.metrics.consensus_seconds.observe(decide_seconds)
            await self.outbox.send_to_members(state.round_id, replies, self._recipients(state.expected))
            self.metrics.labels_published(replies, _arrivals(state, closings), self.clock())
        for closing in closings:
            state.finish(closing.shard_id, closing.status)

    async def _decide(self, state: RoundState, closings: Sequence[ShardClosing]) -> list[Outgoing]:
        """The replies of the shards that closed together: those decided before a restart as they were
        stored, the others decided now (in a worker thread) and stored before they are sent."""
        decided = self.store.decisions(state.round_id, "decided")
        undecided = [c for c in closings if c.shard_id not in decided]
        if undecided:
            slots = {shard_id: shard.prompt_ids for shard_id, shard in state.shards.items()}
            fresh = await asyncio.to_thread(self.strategy.decide, state.round_id, undecided, slots)
            self.store.save_decisions(state.round_id, "decided", _one_per_shard(fresh, undecided))
            decided = self.store.decisions(state.round_id, "decided")
        # Exactly what is stored: a decision made before a restart is re-sent byte for byte.
        return [decided[c.shard_id].reply for c in closings if c.shard_id in decided]

    def _recipients(self, expected: Iterable[str]) -> list[str]:
        """Who gets a round's replies: everyone it expected or active now (stragglers too, so they
        catch up)."""
        return sorted(set(expected) | set(self.active_members()))

    async def _revise_round(self, round_id: int) -> None:
        """Send the revisions late answers made to `round_id`'s decisions, before the next round's
        RoundClosed: a member trains on them with that round's labels. The strategy is asked once per
        round; after a restart the stored revisions are sent again."""
        if round_id < 1:
            return
        if not self.store.stage_done(round_id, "revised"):
            decided = self.store.decisions(round_id, "decided")
            revisions = await asyncio.to_thread(self.strategy.revise, round_id, decided)
            self.store.save_decisions(round_id, "revised", revisions, round_done=True)
        replies = [d.reply for _, d in sorted(self.store.decisions(round_id, "revised").items())]
        if replies:
            recipients = self._recipients(self.store.expected(round_id))
            await self.outbox.send_to_members(round_id, replies, recipients)

    async def _close_round(self, state: RoundState) -> None:
        await self._revise_round(state.round_id - 1)
        closings = self.store.closings(state.round_id)
        outcomes = []
        for c in closings:
            outcomes.append(
                ShardOutcome(
                    shard_id=c.shard_id,
                    status=c.status,
                    reason=c.reason[:256],
                    answered=list(c.answered),
                    labelled=0 if c.decision is None else c.decision.labelled,
                    abstained=0 if c.decision is None else c.decision.abstained,
                )
            )
        now = self.clock()
        summary = RoundClosed(
            federation=self.settings.federation,
            round_id=state.round_id,
            message_id=round_closed_id(self.settings.federation, state.round_id),
            participant_id=COORDINATOR_USER,
            shards=outcomes,
            answered=sorted(state.answered_all_shards()),
            late=sorted(state.late),
            missing=sorted(state.missing()),
            agreement=mean_agreement([c.agreement or {} for c in closings]),
            bytes_received=self.store.traffic(state.round_id, "in"),
            bytes_sent=self.store.traffic(state.round_id, "out"),
            opened_unix=state.opened_at,
            closed_unix=now,
            consensus_seconds=self._decide_seconds,
            final=0 < self.settings.round.rounds <= state.round_id,
        )
        body = encode(summary)
        await self.outbox.announce(state.round_id, summary.message_id, body, [], "round_closed")
        self.store.close_round(state.round_id, now, body)
        self.closed_rounds.append(summary)
        self.metrics.round_closed(summary)
        self._decide_seconds = 0.0
        log.info(
            "round_closed",
            round=state.round_id,
            answered=len(summary.answered),
            late=summary.late,
            missing=summary.missing,
            failed_shards=[o.shard_id for o in outcomes if o.status == "failed"],
        )

    # -- restart -----------------------------------------------------------

    def _restore(self) -> None:
        """Rebuild the open round, if any, from the store after a restart."""
        row = self.store.open_round()
        if row is None:
            return
        opened = stored.announcement.decode(row.announcement)
        state = self._round_state(opened, self._sidelined(row.round_id, opened.expected))
        for shard_id, participant_id, arrived, late in self.store.received(row.round_id):
            if late:
                state.late.setdefault(participant_id, set()).add(shard_id)
            else:
                state.record(shard_id, participant_id, arrived)
        for closing in self.store.closings(row.round_id):
            state.restore_closing(closing.shard_id, closing.status, closing.answered, closing.reason)
        self.round = state
        self.metrics.round_resumed(row.round_id)
        self._pending_announcement = None if row.announced else row
        log.info("round_resumed", round=row.round_id, closings=len(self.store.closings(row.round_id)))

    async def _resume_announcement(self) -> None:
        """A crash between storing a round and announcing it: announce it now."""
        row = self._pending_announcement
        if row is not None:
            await self._announce(
                row.round_id,
                round_opened_id(self.settings.federation, row.round_id),
                row.announcement,
                row.expected,
            )
            self._pending_announcement = None


def build_coordinator(
    settings: CoordinatorSettings,
    transport: Transport,
    *,
    store: CoordinatorStore | None = None,
    prompts: Sequence[PublicPrompt] | None = None,
    embedder: Embedder | None = None,
    clock: Callable[[], float] = time.time,
) -> Coordinator:
    """A coordinator as its settings describe it: the one place that puts store, public prompts and
    strategy together (chorus-coordinator, chorus-run and the tests). Each of `store`, `prompts` and
    `embedder` is None for the one the settings name; whoever opened a store closes it."""
    check_strategy_name(settings.strategy)  # before the store: a refused name leaves no state file behind
    prompts = prompts if prompts is not None else load_prompts(Path(settings.prompts_path))
    opened = store is None
    store = store if store is not None else CoordinatorStore(settings.state_path)
    try:
        strategy = build_round_strategy(settings, store, prompts, embedder)
    except BaseException:
        if opened:
            store.close()
        raise
    return Coordinator(settings, transport, store, strategy, clock=clock)


def _one_per_shard(decisions: Sequence[Decision], closings: Sequence[ShardClosing]) -> list[Decision]:
    """`decisions` for the shards of `closings`, the first of each: a strategy's extra or stray
    decisions are a bug, and are not sent."""
    asked = {c.shard_id for c in closings if c.status == "labelled"}
    kept: dict[int, Decision] = {}
    for decision in decisions:
        if decision.shard_id in asked and decision.shard_id not in kept:
            kept[decision.shard_id] = decision
        else:
            log.error(
                "decision_dropped", shard=decision.shard_id, reason="not a shard it was asked to decide"
            )
    return list(kept.values())


def _arrivals(state: RoundState, closings: Sequence[ShardClosing]) -> list[float]:
    """When each batch that the labelled shards among `closings` were decided from arrived."""
    return [
        arrived
        for closing in closings
        if closing.status == "labelled"
        for participant in closing.answered
        if (arrived := state.shards[closing.shard_id].answered.get(participant)) is not None
    ]


def mean_agreement(per_shard: Sequence[dict[str, float]]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for agreement in per_shard:
        for participant_id, value in agreement.items():
            totals.setdefault(participant_id, []).append(value)
    return {p: round(sum(v) / len(v), 6) for p, v in sorted(totals.items())}
