"""Scripted participants for tests: `participant.testing.ScriptedParticipant` (real transport
clients that answer with canned text, no models), the answers they agree on, and one on RabbitMQ.

They speak the wire protocol exactly as a real participant does, so the coordinator can be tested end
to end on either transport.
"""

from __future__ import annotations

from broker.amqp import AmqpTransport
from participant.testing import ScriptedParticipant

__all__ = ["ScriptedParticipant", "consensus_answers", "participant_at"]


def consensus_answers(participant_id: str, prompt_id: str) -> str:
    """Most participants agree on a paraphrase family; 'mallory' answers nonsense."""
    if participant_id == "mallory":
        return f"purple zebra {prompt_id} xylophone quantum banana"
    variants = ["The answer to {p} is the standard one.", "For {p}, the answer is the standard one."]
    return variants[hash(participant_id) % 2].format(p=prompt_id)


async def participant_at(url: str, name: str, federation: str, **options: object) -> ScriptedParticipant:
    """A scripted participant with `consensus_answers`, logged in to RabbitMQ at `url` (connected)."""
    transport = AmqpTransport(url, connection_name=f"test {name}")
    await transport.__aenter__()
    return ScriptedParticipant(name, transport, consensus_answers, federation=federation, **options)  # type: ignore[arg-type]
