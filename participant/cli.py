"""`chorus-participant`: take part in a federation."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from broker.connect import open_transport
from common.logs import configure_logging
from participant.service import Participant
from participant.settings import ParticipantSettings, load_participant_settings
from participant.wiring import build_learner, load_data
from schemas.errors import ChorusError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-participant",
        description="A Chorus participant: answer rounds, learn from pseudo-labels.",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="join the federation and serve rounds until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="participant TOML settings file")
    run.add_argument(
        "--id", dest="participant_id", help="participant id (its broker user); overrides the file"
    )
    run.add_argument("--broker", help="broker URL, amqp://ID:PASSWORD@HOST:PORT/VHOST; overrides the file")
    run.add_argument("--rounds", type=int, help="exit after applying this many rounds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = load_participant_settings(
            args.config, participant_id=args.participant_id, broker_url=args.broker
        )
        asyncio.run(run_participant(settings, args.rounds))
    except ChorusError as e:
        print(f"chorus-participant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def apply_torch_threads(count: int) -> None:
    """Pin torch's intra-op thread pool (process-wide) when the settings ask; 0 leaves torch's default."""
    if count:
        import torch

        torch.set_num_threads(count)


async def run_participant(settings: ParticipantSettings, rounds: int | None = None) -> None:
    if settings.broker_url.startswith("memory:"):
        raise ChorusError(
            "a participant alone cannot use the in-memory broker; give --broker amqp://..., "
            "or use chorus-run for an embedded federation"
        )
    apply_torch_threads(settings.torch_threads)
    learner = await asyncio.to_thread(build_learner, settings)
    train, test = load_data(settings)
    embed = None
    if settings.evaluate and test:
        from common.embedding import SentenceEmbedder  # the same encoder the coordinator scores with

        embed = SentenceEmbedder().embed
    async with open_transport(
        settings.broker_url, user=settings.participant_id, connection_name=f"chorus-{settings.participant_id}"
    ) as transport:
        participant = Participant(settings, transport, learner, private_train=train, test=test, embed=embed)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, participant.request_stop)
        await participant.run_until(rounds)


if __name__ == "__main__":
    sys.exit(main())
