"""Members that try to write the labels, on a real RabbitMQ node with the default label rule.

Each test runs a real coordinator (documented defaults, the hashing embedder) with honest scripted
members, lets attackers choose their texts, log-probabilities, timing and partners with nothing but
their own logins, and counts the labels that carry an attacker's text (issue #20, points 1-3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support.capture import (
    JUNK,
    PAYLOAD,
    Chooser,
    LateRider,
    captured,
    federation,
    honest_pair,
    honest_text,
    leave,
    member,
    rider_text,
    round_seconds,
)
from support.driving import drive, names
from support.faults import FEDERATION, round_config

from coordinator.reputation import reputation_weights

pytestmark = pytest.mark.amqp

Vhost = Callable[..., dict[str, str]]


def carries_payload(text: str) -> bool:
    return PAYLOAD.strip() in text


async def test_a_reported_logprob_does_not_make_a_riders_text_the_label(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    # Honest black boxes report no logprob; the attacker rides on family 0 and claims logprob 0.0.
    honest_a, honest_b, mallory = names("honest-a", "honest-b", "mallory")
    urls = rabbit_vhost(participants=(honest_a, honest_b, mallory))
    async with federation(urls, round_config(tmp_path, 3)) as coordinator:
        members = [
            *await honest_pair(urls, (honest_a, honest_b), FEDERATION),
            await member(
                urls[mallory], Chooser, mallory, FEDERATION, choose=lambda r, p: rider_text(p), logprob=0.0
            ),
        ]
        try:
            summaries = await drive(coordinator, 2)
        finally:
            await leave(members)
    taken = captured(members[0], carries_payload, (1, 2))
    print(f"rider with logprob 0.0: {taken}; rounds {round_seconds(summaries)}")
    assert taken.labels == 12  # every prompt is labelled, by the honest pair
    assert taken.captured == 0


async def test_late_answers_written_after_the_labels_do_not_rewrite_them(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    # Rounds close on the honest pair (quorum 2 of 3, grace 0); the attacker then answers each round
    # late, with the label it saw plus its payload, hoping to win the revision at staleness 0.5.
    honest_a, honest_b, mallory = names("honest-a", "honest-b", "mallory")
    urls = rabbit_vhost(participants=(honest_a, honest_b, mallory))
    config = round_config(tmp_path, 3, quorum=2, min_participants=3)
    async with federation(urls, config) as coordinator:
        members = [
            *await honest_pair(urls, (honest_a, honest_b), FEDERATION, delay=1.0),
            await member(urls[mallory], LateRider, mallory, FEDERATION),
        ]
        try:
            summaries = await drive(coordinator, 4)
            late = [
                {row.participant_id for row in coordinator.store.batches(r, late_only=True)}
                for r in (1, 2, 3)
            ]
        finally:
            await leave(members)
    taken = captured(members[0], carries_payload, (1, 2, 3))
    print(
        f"late rider through revisions: {taken} (originals and revisions); rounds {round_seconds(summaries)}"
    )
    assert late == [{mallory}] * 3  # the attack reached the coordinator, in time to revise
    assert taken.captured == 0


async def test_a_member_that_lowers_its_own_reputation_cannot_then_take_the_labels(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    # Three rounds of junk drive the attacker's reputation to the floor; then it rides in time.
    honest_a, honest_b, mallory = names("honest-a", "honest-b", "mallory")
    urls = rabbit_vhost(participants=(honest_a, honest_b, mallory))

    def attack(round_id: int, prompt_id: str) -> str:
        return JUNK.format(p=prompt_id) if round_id <= 3 else rider_text(prompt_id)

    async with federation(urls, round_config(tmp_path, 3)) as coordinator:
        members = [
            *await honest_pair(urls, (honest_a, honest_b), FEDERATION),
            await member(urls[mallory], Chooser, mallory, FEDERATION, choose=attack),
        ]
        try:
            summaries = await drive(coordinator, 5)
        finally:
            await leave(members)
    taken = captured(members[0], carries_payload, (4, 5))
    print(f"rider after lowering its reputation: {taken}; rounds {round_seconds(summaries)}")
    assert taken.labels == 12
    assert taken.captured == 0


async def test_two_colluders_tying_the_honest_pair_take_no_label_and_no_reputation(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    # The colluders' ids sort before the honest members'; both pairs send one identical text each.
    colluder_a, colluder_b, honest_y, honest_z = names("a-colluder", "b-colluder", "y-honest", "z-honest")
    urls = rabbit_vhost(participants=(colluder_a, colluder_b, honest_y, honest_z))
    junk = lambda r, p: JUNK.format(p=p)  # noqa: E731
    honest = lambda r, p: honest_text(0, p)  # noqa: E731
    async with federation(urls, round_config(tmp_path, 4)) as coordinator:
        members = [
            await member(urls[colluder_a], Chooser, colluder_a, FEDERATION, choose=junk),
            await member(urls[colluder_b], Chooser, colluder_b, FEDERATION, choose=junk),
            await member(urls[honest_y], Chooser, honest_y, FEDERATION, choose=honest),
            await member(urls[honest_z], Chooser, honest_z, FEDERATION, choose=honest),
        ]
        try:
            summaries = await drive(coordinator, 4)
        finally:
            await leave(members)
    taken = captured(members[2], lambda text: "zebra" in text, range(1, 5))
    print(
        f"two colluders: {taken}; rounds {round_seconds(summaries)}; "
        f"agreement {[dict(s.agreement) for s in summaries]}"
    )
    assert taken.captured == 0
    # Reputation as round 5 would weigh the members: the honest pair is not locked out.
    weights = reputation_weights([s.agreement for s in summaries], [honest_y, honest_z], floor=0.1)
    assert weights[honest_y] == weights[honest_z] == 1.0
