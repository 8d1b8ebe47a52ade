"""Prometheus metrics and /healthz, scraped over real HTTP from a real coordinator and real participants
on RabbitMQ, during a round and after it; and the settings and server they rest on."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from support.coordinators import coordinator_at, write_config
from support.faults import gated_at
from support.tiny_models import coordinator_config, tiny_participant
from support.waiting import eventually

from broker.amqp import AmqpTransport
from broker.memory import MemoryBroker
from broker.topology import UP_EXCHANGE, full_topology, generation_key
from common.metrics_http import Health, MetricsError, MetricsServer
from common.settings import MetricsTable, SettingsError
from coordinator.settings import load_coordinator_settings
from participant.data import Example
from participant.generation import GeneratedAnswer
from participant.learner import FunctionLearner, LoraLearner, PromptBatch
from participant.service import Participant
from participant.settings import ParticipantSettings, load_participant_settings
from participant.training import TrainStats
from schemas.messages import GenerationParams, Heartbeat, new_message_id

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Vhost = Callable[..., dict[str, str]]
METRICS_ON = "\n[metrics]\nenabled = true\nport = 0\n"


# -- scraping ----------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def scrape(base: str) -> Samples:
    """Every sample at base/metrics, by (name, sorted labels), parsed by prometheus_client's parser."""
    status, body = await asyncio.to_thread(_get, f"{base}/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def health(base: str) -> tuple[int, dict[str, Any]]:
    status, body = await asyncio.to_thread(_get, f"{base}/healthz")
    return status, json.loads(body)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def served_at(server: MetricsServer | None) -> str:
    assert server is not None, "metrics were enabled: the service should serve them"
    return server.url


# -- the coordinator on RabbitMQ ---------------------------------------------------


@pytest.mark.amqp
async def test_coordinator_metrics_and_health_during_and_after_a_real_round(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    urls = rabbit_vhost(participants=("mia", "noa"))
    # One round of 6 prompts in 3 shards that waits for both; "faults" is the federation gated_at speaks.
    config = write_config(
        tmp_path, federation="faults", min_participants=2, quorum=2, deadline_seconds=60.0, grace_seconds=0.0
    )
    config.write_text(config.read_text() + METRICS_ON)
    coordinator = await coordinator_at(urls["coordinator"], config)
    gate = asyncio.Event()
    mia = await gated_at(urls["mia"], "mia", gate, hold_after=1)  # answers shard 0, then waits for the gate
    noa = await gated_at(urls["noa"], "noa")
    await coordinator.start()
    base = served_at(coordinator.metrics.server)
    status, body = await health(base)
    assert status == 200
    assert body.pop("seconds_since_progress") >= 0
    assert body == {"status": "ok", "connected": True, "round": None, "rounds_closed": 0}
    for participant in (mia, noa):
        await participant.join()
    drive = asyncio.create_task(coordinator.drive())
    await eventually(lambda: bool(mia.opened), timeout=15)
    await mia.transport.publish(
        UP_EXCHANGE, generation_key(0, "mia"), b"\xc1 is never msgpack", message_id="garbage-1"
    )

    # During the round: noa answered all three shards, mia only shard 0, which closed and was labelled.
    async def mid_round() -> bool:
        samples = await scrape(base)
        return value(samples, "chorus_coordinator_batches_accepted_total") == 4 and bool(
            value(samples, "chorus_coordinator_queue_to_labels_seconds_count")
        )

    await eventually(mid_round, timeout=15)
    samples = await scrape(base)
    assert value(samples, "chorus_coordinator_dead_lettered_total", reason="schema") == 1
    assert value(samples, "chorus_coordinator_current_round") == 1
    assert value(samples, "chorus_coordinator_rounds_opened_total") == 1
    assert value(samples, "chorus_coordinator_rounds_closed_total") == 0
    assert value(samples, "chorus_coordinator_members") == 2
    assert value(samples, "chorus_coordinator_sidelined_members") == 0
    assert value(samples, "chorus_coordinator_queue_to_labels_seconds_count") == 2  # both batches of shard 0
    assert value(samples, "chorus_coordinator_consensus_seconds_count") == 1
    assert (value(samples, "chorus_coordinator_embedding_seconds_count") or 0) >= 1
    assert (value(samples, "chorus_coordinator_received_bytes_total") or 0) > 0
    assert (value(samples, "chorus_coordinator_published_bytes_total") or 0) > 0
    await eventually(lambda: (1, 0) in noa.labels)
    labels_shard_0 = len(noa.labels[(1, 0)].labels)
    assert value(samples, "chorus_coordinator_label_confidence_count") == labels_shard_0
    status, body = await health(base)
    assert (status, body["round"], body["rounds_closed"], body["connected"]) == (200, 1, 0, True)

    gate.set()
    await asyncio.wait_for(drive, 30)
    after = await scrape(base)
    assert value(after, "chorus_coordinator_batches_accepted_total") == 6
    assert value(after, "chorus_coordinator_duplicates_total") == 0
    assert value(after, "chorus_coordinator_batches_late_total") == 0
    assert value(after, "chorus_coordinator_rounds_closed_total") == 1
    assert value(after, "chorus_coordinator_rounds_failed_total") == 0
    assert value(after, "chorus_coordinator_current_round") == 0
    assert value(after, "chorus_coordinator_queue_to_labels_seconds_count") == 6
    # Shard 0, then shards 1 and 2: together, or one after the other as mia's batches come in.
    assert value(after, "chorus_coordinator_consensus_seconds_count") in (2, 3)
    await eventually(lambda: len(noa.labels) == 3)
    assert value(after, "chorus_coordinator_label_confidence_count") == sum(
        len(message.labels) for message in noa.labels.values()
    )
    rounds = "chorus_coordinator_participant_rounds_total"
    for name in ("mia", "noa"):
        assert value(after, rounds, participant=name, outcome="answered") == 1
        assert value(after, rounds, participant=name, outcome="missing") is None
    assert (value(after, "chorus_coordinator_published_bytes_total") or 0) > (
        value(samples, "chorus_coordinator_published_bytes_total") or 0
    )
    status, body = await health(base)
    assert (status, body["round"], body["rounds_closed"]) == (200, None, 1)
    assert 0 <= body["seconds_since_progress"] < 30

    # The broker link goes: /healthz says so with a 503; stopping the service stops the server.
    await coordinator.transport.close()
    status, body = await health(base)
    assert (status, body["status"], body["connected"]) == (503, "disconnected", False)
    await coordinator.stop_intake()
    assert coordinator.metrics.server is None
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"{base}/healthz")
    for participant in (mia, noa):
        await participant.leave()
        await participant.transport.close()


# -- participants on tiny models, on RabbitMQ -------------------------------------------


class AgreeingLearner:
    """Wraps a learner: it generates with the real model but answers with agreed text (two tiny random
    models agree on nothing, and consensus would label nothing); when `gated`, its round training
    (every `train` after the warm-up) waits for `release`."""

    def __init__(self, inner: LoraLearner, *, gated: bool) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.gated = gated
        self.calls = 0
        self.training = threading.Event()
        self.release = threading.Event()

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        answers = self.inner.generate(prompts, params)
        return [replace(a, text=f"The agreed answer to {a.prompt_id}.") for a in answers]

    def train(self, examples: Sequence[Example]) -> TrainStats:
        self.calls += 1
        if self.gated and self.calls >= 2:
            self.training.set()
            assert self.release.wait(30)
        return self.inner.train(examples)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.amqp
async def test_participant_metrics_and_health_during_and_after_a_real_round(
    tmp_path: Path, rabbit_vhost: Vhost, one_torch_thread: None
) -> None:
    urls = rabbit_vhost(participants=("llama", "gpt2"))
    coordinator = await coordinator_at(urls["coordinator"], coordinator_config(tmp_path, rounds=1))
    gated: list[AgreeingLearner] = []

    def gate(learner: LoraLearner) -> AgreeingLearner:
        gated.append(AgreeingLearner(learner, gated=True))
        return gated[-1]

    def agree(learner: LoraLearner) -> AgreeingLearner:
        return AgreeingLearner(learner, gated=False)

    llama = tiny_participant(AmqpTransport(urls["llama"]), tmp_path, "llama", "tiny-llama", wrap=gate)
    gpt2 = tiny_participant(AmqpTransport(urls["gpt2"]), tmp_path, "gpt2", "tiny-gpt2", wrap=agree)
    for participant in (llama, gpt2):
        metrics = msgspec.structs.replace(participant.settings.metrics, enabled=True, port=0)
        participant.settings = msgspec.structs.replace(participant.settings, metrics=metrics)
    await coordinator.start()
    await asyncio.gather(llama.start(), gpt2.start())
    base = served_at(llama.metrics.server)
    assert base != served_at(gpt2.metrics.server)  # port 0: each its own free port
    status, body = await health(base)
    assert (status, body["connected"], body["last_round_applied"]) == (200, True, None)
    drive = asyncio.create_task(coordinator.drive())

    # During the round: llama answered and is training on its labels (held there).
    (learner,) = gated
    assert await asyncio.to_thread(learner.training.wait, 60)
    during = await scrape(base)
    assert value(during, "chorus_participant_generation_seconds_count") == 1
    assert (value(during, "chorus_participant_generated_tokens_total") or 0) > 0
    assert (value(during, "chorus_participant_tokens_per_second") or 0) > 0
    assert value(during, "chorus_participant_training_seconds_count") == 0
    assert value(during, "chorus_participant_last_round_applied") == 0
    assert value(during, "chorus_participant_labels_applied_total") == 0
    status, body = await health(base)
    assert (status, body["round"], body["last_round_applied"]) == (200, 1, None)

    learner.release.set()
    await asyncio.wait_for(drive, 60)
    await eventually(lambda: llama.rounds_done == [1] and gpt2.rounds_done == [1], timeout=60)
    after = await scrape(base)
    assert value(after, "chorus_participant_training_seconds_count") == 1
    assert value(after, "chorus_participant_last_round_applied") == 1
    labels = len(llama.ledger.labelled_examples(1))
    assert labels > 0
    assert value(after, "chorus_participant_labels_applied_total") == labels
    assert value(after, "chorus_participant_publish_errors_total") == 0
    status, body = await health(base)
    assert (status, body["round"], body["last_round_applied"]) == (200, 1, 1)

    for participant in (llama, gpt2):
        await participant.stop()
        assert participant.metrics.server is None
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"{base}/metrics")
    await coordinator.stop_intake()
    for transport in (llama.transport, gpt2.transport, coordinator.transport):
        await transport.close()


# -- the pieces, without a broker ----------------------------------------------------


def test_metrics_are_off_by_default_and_their_table_is_validated(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert load_coordinator_settings(config, env={}).metrics == MetricsTable()
    assert not MetricsTable().enabled and MetricsTable().host == "127.0.0.1"
    config.write_text(config.read_text() + '[metrics]\nenabled = true\nport = 9999\nhost = "::1"\n')
    assert load_coordinator_settings(config, env={}).metrics == MetricsTable(
        enabled=True, port=9999, host="::1"
    )
    text = config.read_text()
    for bad, named in (
        ("port = 70000", "metrics.port"),
        ('host = "a b"\nport = 1', "metrics.host"),
        ("prot = 9464", "prot"),
    ):
        config.write_text(text.replace('port = 9999\nhost = "::1"', bad))
        with pytest.raises(SettingsError, match=named):
            load_coordinator_settings(config, env={})


def test_the_metrics_port_variable_enables_them(tmp_path: Path) -> None:
    config = tmp_path / "participant.toml"
    config.write_text('participant_id = "alice"\n')
    participant = load_participant_settings(config, env={})
    assert (participant.metrics.enabled, participant.metrics.port) == (False, 9465)  # beside a coordinator's
    enabled = load_participant_settings(config, env={"CHORUS_METRICS_PORT": "0"}).metrics
    assert (enabled.enabled, enabled.port, enabled.host) == (True, 0, "127.0.0.1")
    with pytest.raises(SettingsError, match="CHORUS_METRICS_PORT must be a port number"):
        load_participant_settings(config, env={"CHORUS_METRICS_PORT": "ninety"})
    coordinator = load_coordinator_settings(write_config(tmp_path / "c"), env={"CHORUS_METRICS_PORT": "9500"})
    assert (coordinator.metrics.enabled, coordinator.metrics.port) == (True, 9500)


async def test_server_serves_a_registry_and_health_and_refuses_a_taken_port() -> None:
    registry = CollectorRegistry()
    served = Counter("chorus_test_things", "Things.", registry=registry)
    served.inc(3)
    connected = True
    server = MetricsServer("127.0.0.1", 0, registry, lambda: Health(connected, {"round": 7}))
    try:
        assert server.port > 0
        assert value(await scrape(server.url), "chorus_test_things_total") == 3
        assert await health(server.url) == (200, {"status": "ok", "connected": True, "round": 7})
        connected = False
        assert await health(server.url) == (503, {"status": "disconnected", "connected": False, "round": 7})
        with pytest.raises(MetricsError, match="choose another \\[metrics\\] port"):
            MetricsServer("127.0.0.1", server.port, registry, lambda: Health(True))
    finally:
        await server.close()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"{server.url}/metrics")


async def test_a_participant_counts_its_failed_publishes(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["alice"]))
    settings = ParticipantSettings(participant_id="alice", state_dir=str(tmp_path), progress=False)
    learner = FunctionLearner(lambda prompt: "an answer", "echo")
    participant = Participant(settings, broker.connect("alice"), learner)
    await participant.transport.close()  # every publish now fails
    beat = Heartbeat(
        federation="chorus", round_id=0, message_id=new_message_id(), participant_id="alice", sent_unix=0.0
    )
    with pytest.raises(Exception, match="closed"):
        await participant._publish_control(beat)
    samples: Samples = {
        (s.name, ()): s.value for f in participant.metrics.registry.collect() for s in f.samples
    }
    assert value(samples, "chorus_participant_publish_errors_total") == 1
    participant.ledger.close()
