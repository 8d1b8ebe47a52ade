"""The deterministic message ids of PROTOCOL.md §7.4, built in one place.

Participants' ids start with their own id (`<participant>.r<round>.`); the coordinator's with the
federation's. A republish after a crash reuses the same id, which makes it a harmless duplicate.
"""

from __future__ import annotations

import re

from schemas.messages import ID_CHARS, ID_MAX_LENGTH

# An id in the participants' deterministic format, and the participant it names.
NAMED_SENDER = re.compile(rf"^([{ID_CHARS}]{{1,{ID_MAX_LENGTH}}})\.r[0-9]+\.")


def batch_id(participant_id: str, round_id: int, shard_id: int) -> str:
    return f"{participant_id}.r{round_id}.s{shard_id}.gen"


def adapter_update_id(participant_id: str, round_id: int) -> str:
    return f"{participant_id}.r{round_id}.adapter"


def report_id(participant_id: str, round_id: int) -> str:
    return f"{participant_id}.r{round_id}.report"


def round_opened_id(federation: str, round_id: int) -> str:
    return f"{federation}.r{round_id}.opened"


def pseudo_labels_id(federation: str, round_id: int, shard_id: int) -> str:
    return f"{federation}.r{round_id}.s{shard_id}.labels"


def label_revision_id(federation: str, round_id: int, shard_id: int) -> str:
    return f"{federation}.r{round_id}.s{shard_id}.labels.rev1"


def aggregated_adapter_id(federation: str, round_id: int) -> str:
    return f"{federation}.r{round_id}.adapter"


def round_closed_id(federation: str, round_id: int) -> str:
    return f"{federation}.r{round_id}.closed"


def named_sender(message_id: str) -> str | None:
    """The participant a deterministic-format id names, or None for an id in another format."""
    match = NAMED_SENDER.match(message_id)
    return None if match is None else match.group(1)
