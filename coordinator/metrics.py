"""The coordinator's Prometheus metrics (`chorus_coordinator_*`) and the facts its /healthz reports.

The service calls the hooks below at the moments they name; what intake and the outbox already
tally (accepted, duplicate, late and dead-lettered messages, bytes in and out) is read from their
tallies when Prometheus scrapes, so their hot paths only add to plain ints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics_http import ServiceMetrics
from coordinator import stored
from coordinator.decisions import Outgoing
from coordinator.intake import Counters
from coordinator.rounds import RoundState
from schemas.messages import RoundClosed

PREFIX = "chorus_coordinator_"
# Consensus and embedding of one closing step: milliseconds (hashing, cached) to minutes (cold MiniLM).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# From a batch's arrival to its shard's labels: up to the round's deadline (600 s by default) and beyond.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Cosine similarities; the default abstention threshold sits in the 0.5-0.7 range.
CONFIDENCE_BUCKETS = (-0.5, 0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class CoordinatorMetrics(ServiceMetrics):
    """Every `chorus_coordinator_*` metric.

    `intake_counters()` and `published_bytes()` are read on each scrape, from the HTTP server's
    thread: they must return plain values the event loop keeps up to date.
    """

    def __init__(self, intake_counters: Callable[[], Counters], published_bytes: Callable[[], int]) -> None:
        super().__init__(PREFIX)
        self.rounds_opened = self.counter("rounds_opened", "Rounds opened.")
        self.rounds_closed = self.counter("rounds_closed", "Rounds closed (failed ones too).")
        self.rounds_failed = self.counter(
            "rounds_failed",
            "Closed rounds with at least one shard failed (below quorum at the deadline: no labels for it).",
        )
        self.participant_rounds = self.counter(
            "participant_rounds",
            "Closed rounds per participant and outcome: answered (counted in a shard's consensus), "
            "late (answered a shard after it closed), missing (expected, sent nothing).",
            ["participant", "outcome"],
        )
        self.consensus_seconds = self.histogram(
            "consensus_seconds",
            "Time the strategy took to decide the shards that closed together (embedding included).",
            SECONDS_BUCKETS,
        )
        self.embedding_seconds = self.histogram(
            "embedding_seconds",
            "Time of each call to the sentence embedder during consensus (cache lookups included).",
            SECONDS_BUCKETS,
        )
        # The parts of a decision a strategy may time (`RoundStrategy.time_parts`), by name.
        self._parts = {"embedding": self.embedding_seconds}
        self.label_confidence = self.histogram(
            "label_confidence",
            "Confidence (mean similarity to the other answers) of each published pseudo-label.",
            CONFIDENCE_BUCKETS,
        )
        self.queue_to_labels_seconds = self.histogram(
            "queue_to_labels_seconds",
            "From a batch's arrival at intake to the publication of its shard's labels, per batch.",
            LATENCY_BUCKETS,
        )
        self.current_round = self.gauge("current_round", "The open round's id; 0 while no round is open.")
        self.members = self.gauge(
            "members",
            "Active members (seen within round.member_timeout_seconds) when a round last could open.",
        )
        self.sidelined = self.gauge(
            "sidelined_members",
            "Members of the latest round that are asked but not waited for (they left a shard "
            "unanswered in each of the last round.sideline_after_missed_rounds rounds).",
        )
        self.registry.register(TalliesCollector(intake_counters, published_bytes))

    # -- hooks the service calls -----------------------------------------------

    def round_opened(self, round_id: int, sidelined: int) -> None:
        self.rounds_opened.inc()
        self.current_round.set(round_id)
        self.sidelined.set(sidelined)
        self.progress.mark()

    def round_resumed(self, round_id: int) -> None:
        self.current_round.set(round_id)

    def labels_published(self, replies: Sequence[Outgoing], arrivals: Iterable[float], now: float) -> None:
        """A closing step's replies were published: their labels' confidences, and the wait of each
        batch (arrival time, the service's clock) they were decided from."""
        for reply in replies:
            if reply.kind == "pseudo_labels":
                for label in stored.pseudo_labels.decode(reply.body).labels:
                    self.label_confidence.observe(label.confidence)
        for arrived in arrivals:
            self.queue_to_labels_seconds.observe(max(0.0, now - arrived))
        self.progress.mark()

    def round_closed(self, summary: RoundClosed) -> None:
        self.rounds_closed.inc()
        if any(outcome.status == "failed" for outcome in summary.shards):
            self.rounds_failed.inc()
        for outcome, participants in (
            ("answered", summary.answered),
            ("late", summary.late),
            ("missing", summary.missing),
        ):
            for participant in participants:  # members only: each has a provisioned broker user
                self.participant_rounds.labels(participant=participant, outcome=outcome).inc()
        self.current_round.set(0)
        self.progress.mark()

    def observe_part(self, part: str, seconds: float) -> None:
        """How long one timed part of a strategy's decision took (`RoundStrategy.time_parts`), from
        the strategy's worker thread (prometheus_client's metrics are thread-safe); a part without a
        metric here is not recorded."""
        histogram = self._parts.get(part)
        if histogram is not None:
            histogram.observe(seconds)

    def health_facts(self, state: RoundState | None, rounds_closed: int) -> Mapping[str, object]:
        return {
            "round": None if state is None else state.round_id,
            "rounds_closed": rounds_closed,
            "seconds_since_progress": self.progress.seconds_since(),
        }


class TalliesCollector(Collector):
    """Intake's and the outbox's running tallies, as counters, read at scrape time."""

    def __init__(self, intake_counters: Callable[[], Counters], published_bytes: Callable[[], int]) -> None:
        self._intake_counters = intake_counters
        self._published_bytes = published_bytes

    def collect(self) -> Iterator[Metric]:
        counters = self._intake_counters()
        yield CounterMetricFamily(
            f"{PREFIX}batches_accepted",
            "Generation batches stored in time for their shard.",
            counters.accepted,
        )
        yield CounterMetricFamily(
            f"{PREFIX}batches_late", "Generation batches stored after their shard closed.", counters.late
        )
        yield CounterMetricFamily(
            f"{PREFIX}duplicates",
            "Messages acked as duplicates of one already stored (batches, reports, adapters).",
            counters.duplicates,
        )
        dead = CounterMetricFamily(
            f"{PREFIX}dead_lettered",
            "Messages dead-lettered to chorus.dead, by the first word of their x-chorus-reason.",
            labels=["reason"],
        )
        for reason, count in sorted(counters.rejections.copy().items()):  # a copy: the loop adds keys
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily(
            f"{PREFIX}received_bytes",
            "Body bytes of every message intake handled (accepted, duplicate or dead-lettered).",
            counters.received_bytes,
        )
        yield CounterMetricFamily(
            f"{PREFIX}published_bytes",
            "Body bytes of every confirmed publish (one publish to many members counts once).",
            self._published_bytes(),
        )
