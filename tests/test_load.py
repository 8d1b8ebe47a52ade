"""Many participant connections publish at once to one node: nothing lost, rounds close.

The numbers in docs/results.md come from `python -m bench.bench_load` (100 connections);
`make test` runs 30 connections for two rounds, `make soak` the full 100 for three.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.bench_load import SHARDS, run_load

pytestmark = [pytest.mark.amqp, pytest.mark.slow]


async def check_load(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]], participants: int, rounds: int
) -> None:
    names = tuple(f"load-{secrets.token_hex(3)}-{i}" for i in range(participants))
    urls = rabbit_vhost(participants=names)
    coordinator_url = urls.pop("coordinator")
    result = await run_load(coordinator_url, urls, rounds, tmp_path)
    assert result.generations_confirmed == participants * rounds * SHARDS
    assert result.lost_generations == 0
    assert result.participants_missing_labels == 0  # every participant got every shard's labels
    assert result.answered_per_round == [participants] * rounds  # the coordinator stayed up, closed all
    assert result.coordinator_peak_rss_mib > 0
    assert all(latency < 10.0 for latency in result.close_latency_seconds)


async def test_thirty_connections_publish_concurrently(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    await check_load(tmp_path, rabbit_vhost, participants=30, rounds=2)


@pytest.mark.soak
async def test_hundred_connections_publish_concurrently(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    await check_load(tmp_path, rabbit_vhost, participants=100, rounds=3)
