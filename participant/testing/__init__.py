"""Test helpers Chorus ships for its own tests and for anyone writing a learner, a strategy or a client.

- `ScriptedParticipant` (`participant.testing.scripted`): a real transport client answering with canned
  text, no model; run a coordinator against a few of them on the in-memory broker.
- `participant.testing.tiny_models`: the seeded 2-layer models behind ``tiny-llama`` / ``tiny-gpt2``
  (imports torch and transformers, so it is not imported here).
"""

from participant.testing.scripted import AnswerFn, ScriptedParticipant, publish_join

__all__ = ["AnswerFn", "ScriptedParticipant", "publish_join"]
