"""`chorus-participant`: take part in a federation."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.addresses import is_memory
from broker.connect import open_transport
from common.exits import EXIT_INTERRUPTED, EXIT_OK, count_argument, run_command
from common.interrupts import StopSignals, report_interrupted
from common.logs import configure_logging
from participant.settings import ParticipantSettings, SettingsError, load_participant_settings

# The service and a local model's learner (torch and transformers: seconds) load only once the settings
# are valid and the broker has let the participant in, so that a mistake in either is reported at once.
if TYPE_CHECKING:
    from participant.evaluation import Embedder
    from participant.learner import Learner


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
    run.add_argument(
        "--broker",
        help="broker URL, amqp://ID:PASSWORD@HOST:PORT/VHOST, or several nodes of one cluster separated by "
        "';' (the first reachable one is used, the others on connection loss); overrides the file and "
        "CHORUS_BROKER_URL. Prefer those for a URL with a password: `ps` shows a command line to every user",
    )
    run.add_argument("--rounds", type=count_argument, help="exit after applying this many rounds")
    export = commands.add_parser(
        "export",
        help="write a round's model as a PEFT adapter folder (or, --merged, a whole Hugging Face model)",
        description="Export a checkpoint of this participant's current run, with its tokenizer and chat "
        "template, as folders that transformers and peft load without Chorus. A last_layers member "
        "always exports merged.",
    )
    export.add_argument("--state-dir", type=Path, required=True, help="the participant's state_dir")
    export.add_argument(
        "--round",
        dest="round_id",
        type=_round_argument,
        default=None,
        help="round N's checkpoint (0: after warm-up), or latest (the default)",
    )
    export.add_argument(
        "--out", type=Path, required=True, help="folder to write (must not exist or be empty)"
    )
    export.add_argument(
        "--merged", action="store_true", help="fold the adapter into the base: a complete model folder"
    )
    export.add_argument(
        "--model",
        help="the base model the checkpoints were trained from, if the state_dir does not record it",
    )
    export.add_argument(
        "--cache-dir", type=Path, help="where the converted SmolLM2 is cached, if not the default"
    )
    return parser


def _round_argument(text: str) -> int | None:
    return None if text == "latest" else count_argument(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_command("chorus-participant", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        return _export(args)
    settings = load_participant_settings(
        args.config, participant_id=args.participant_id, broker_url=args.broker
    )
    try:
        interrupted = asyncio.run(run_participant(settings, args.rounds))
    except (KeyboardInterrupt, asyncio.CancelledError):  # before the handlers, or a second Ctrl-C
        interrupted = True
    if interrupted:
        report_interrupted("chorus-participant")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from participant.export import export_model

    exported = export_model(
        args.state_dir,
        args.out,
        round_id=args.round_id,
        merged=args.merged,
        model=args.model,
        cache_dir=args.cache_dir,
    )
    what = "merged model" if exported.kind == "merged" else "LoRA adapter"
    print(
        f"exported round {exported.round_id} of {args.state_dir} as a {what} on "
        f"{exported.record.base_model_name_or_path} to {exported.out}"
    )
    if exported.note:
        print(f"note: {exported.note}")
    return EXIT_OK


def apply_torch_threads(count: int) -> None:
    """Pin torch's intra-op thread pool (process-wide) when the settings ask; 0 leaves torch's default."""
    if count:
        import torch

        torch.set_num_threads(count)


def load_models(
    settings: ParticipantSettings, *, evaluate: bool, learner: Learner | None = None
) -> tuple[Learner, Embedder | None]:
    """The learner (given, or the one the settings describe), and the sentence encoder that scores its
    answers when it evaluates (seconds each)."""
    from participant.wiring import build_learner

    learner = build_learner(settings) if learner is None else learner
    if not evaluate:
        return learner, None
    from common.embedding import SentenceEmbedder  # the same encoder the coordinator scores with

    return learner, SentenceEmbedder().embed


async def run_participant(
    settings: ParticipantSettings, rounds: int | None = None, learner: Learner | None = None
) -> bool:
    """Serve rounds until `rounds` are applied, the federation ends, or a signal; True after Ctrl-C.
    `learner` takes part in place of the one the settings describe."""
    if is_memory(settings.broker_url):
        raise SettingsError(
            "a participant alone cannot use the in-memory broker; give --broker amqp://... (or set "
            "CHORUS_BROKER_URL, or broker_url in the settings file), "
            "or use chorus-run for an embedded federation"
        )
    async with open_transport(
        settings.broker_url, user=settings.participant_id, connection_name=f"chorus-{settings.participant_id}"
    ) as transport:
        from participant.service import Participant
        from participant.wiring import load_data

        apply_torch_threads(settings.torch_threads)
        train, test = load_data(settings)
        taking_part, embed = await asyncio.to_thread(
            load_models, settings, evaluate=settings.evaluate and bool(test), learner=learner
        )
        participant = Participant(
            settings, transport, taking_part, private_train=train, test=test, embed=embed
        )
        with StopSignals(participant.request_stop, service="chorus-participant") as signals:
            await participant.run_until(rounds)
        return signals.interrupted


if __name__ == "__main__":
    sys.exit(main())
