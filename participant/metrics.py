"""A participant's Prometheus metrics (`chorus_participant_*`) and the facts its /healthz reports.

The service calls the hooks below; /healthz reads plain attributes only,
from the metrics server's thread.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.metrics_http import ServiceMetrics

PREFIX = "chorus_participant_"
# Generating a round's answers or training on its labels: a second (tiny models) to an hour (a big
# model on a CPU).
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class ParticipantMetrics(ServiceMetrics):
    """Every `chorus_participant_*` metric."""

    def __init__(self) -> None:
        super().__init__(PREFIX)
        self.round: int | None = None  # the latest round announced to this participant
        self.last_applied: int | None = None  # the latest round whose labels (or adapter) were applied
        self.generation_seconds = self.histogram(
            "generation_seconds",
            "Time to generate the answers to one round's prompts (all its shards).",
            SECONDS_BUCKETS,
        )
        self.training_seconds = self.histogram(
            "training_seconds",
            "Time of one round's training (on its labels mixed with private data, or FedAvg's local "
            "training), checkpoint included; the warm-up before round 1 is not counted.",
            SECONDS_BUCKETS,
        )
        self.generated_tokens = self.counter("generated_tokens", "Tokens generated in answers to rounds.")
        self.tokens_per_second = self.gauge(
            "tokens_per_second",
            "Generation throughput of the latest round: its tokens over its generation time.",
        )
        self.last_round_applied = self.gauge(
            "last_round_applied",
            "The latest round whose labels (or averaged adapter) were applied; 0 before the first.",
        )
        self.labels_applied = self.counter(
            "labels_applied", "Pseudo-labels in the rounds this participant trained on."
        )
        self.answers_withheld = self.counter(
            "answers_withheld",
            "Answers the leak guard withheld (sent blank or left out) for sharing a span with a private "
            "example (participant/leak_guard.py).",
        )
        self.privacy_epsilon = self.gauge(
            "privacy_epsilon",
            "With [train.privacy]: the privacy budget (epsilon, at the settings' delta) spent on private "
            "examples so far (participant/privacy.py).",
        )
        self.publish_errors = self.counter(
            "publish_errors",
            "Publishes to the broker that failed (no confirm in time, refused, unroutable, disconnected).",
        )

    # -- hooks the service calls -----------------------------------------------

    def started(self, last_applied: int) -> None:
        self.last_applied = last_applied or None
        self.last_round_applied.set(last_applied)
        self.progress.mark()

    def round_announced(self, round_id: int) -> None:
        self.round = round_id
        self.progress.mark()

    def generated(self, seconds: float, tokens: int) -> None:
        self.generation_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)
        self.progress.mark()

    def trained(self, seconds: float, labels: int) -> None:
        self.training_seconds.observe(seconds)
        self.labels_applied.inc(labels)
        self.progress.mark()

    def privacy_spent(self, epsilon: float) -> None:
        self.privacy_epsilon.set(epsilon)

    def applied(self, round_id: int) -> None:
        self.last_applied = round_id
        self.last_round_applied.set(round_id)
        self.progress.mark()

    def health_facts(self) -> Mapping[str, object]:
        return {
            "round": self.round,
            "last_round_applied": self.last_applied,
            "seconds_since_progress": self.progress.seconds_since(),
        }
