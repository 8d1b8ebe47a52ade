"""`chorus-coordinator`: run the coordinator service, or show its state."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from broker.addresses import is_memory
from broker.connect import open_transport
from common.exits import EXIT_INTERRUPTED, EXIT_OK, count_argument, run_command
from common.interrupts import StopSignals, report_interrupted
from common.logs import configure_logging
from coordinator.prompts import PublicPrompt, load_prompts
from coordinator.replay.recording import with_recording
from coordinator.runtime import prepare_service_process
from coordinator.service import build_coordinator
from coordinator.settings import CoordinatorSettings, SettingsError, load_coordinator_settings
from coordinator.store import CoordinatorStore, StateLock
from schemas.codec import decode_reply
from schemas.errors import ChorusError
from schemas.messages import RoundClosed

log = structlog.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-coordinator", description="The Chorus coordinator: rounds, consensus, pseudo-labels."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run rounds against a broker until done or SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="coordinator TOML settings file")
    run.add_argument(
        "--broker",
        help="broker URL (amqp://user:pass@host:port/vhost), or several nodes of one cluster separated "
        "by ';' (the first reachable one is used, the others on connection loss); overrides the file and "
        "CHORUS_BROKER_URL. Prefer those for a URL with a password: `ps` shows a command line to every user",
    )
    run.add_argument("--rounds", type=count_argument, help="number of rounds to run (0 = until stopped)")
    status = commands.add_parser("status", help="rounds and shards from the state database, as a table")
    status.add_argument("--config", type=Path, help="settings file naming the state database")
    status.add_argument("--state", type=Path, help="the state database itself")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "status" and args.state is None and args.config is None:
        parser.error("status needs --state DB or --config FILE")
    configure_logging(args.log_level)
    return run_command("chorus-coordinator", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.command == "run":
        settings = load_coordinator_settings(args.config, broker_url=args.broker)
        if args.rounds is not None:
            settings = _with_rounds(settings, args.rounds)
        try:
            interrupted = asyncio.run(run_coordinator(settings))
        except (KeyboardInterrupt, asyncio.CancelledError):  # before the handlers, or a second Ctrl-C
            interrupted = True
        if interrupted:
            report_interrupted("chorus-coordinator")
            return EXIT_INTERRUPTED
    else:
        print_status(_state_path(args))
    return EXIT_OK


def _with_rounds(settings: CoordinatorSettings, rounds: int) -> CoordinatorSettings:
    import msgspec

    return msgspec.structs.replace(settings, round=msgspec.structs.replace(settings.round, rounds=rounds))


def _state_path(args: argparse.Namespace) -> Path:
    if args.state is not None:
        return Path(args.state)
    return Path(load_coordinator_settings(args.config).state_path)


async def run_coordinator(settings: CoordinatorSettings) -> bool:
    """Run until the configured rounds are done; SIGTERM/SIGINT stop intake and finish the step.
    True when Ctrl-C (SIGINT) stopped it."""
    if is_memory(settings.broker_url):
        raise SettingsError(
            "the coordinator alone cannot use the in-memory broker (participants could not reach it); "
            "give --broker amqp://... (or set CHORUS_BROKER_URL, or broker_url in the settings file), "
            "or use chorus-run for an embedded federation"
        )
    prompts = load_prompts(Path(settings.prompts_path))
    # Held until this process ends (the kernel drops it on any death): a second coordinator on the same
    # state stops here, before it touches the file or the broker.
    with StateLock(settings.state_path):
        return await _serve(settings, prompts)


async def _serve(settings: CoordinatorSettings, prompts: list[PublicPrompt]) -> bool:
    store = CoordinatorStore(settings.state_path)
    log.info("coordinator_state", state=settings.state_path, run_id=store.run_id)
    try:
        connection = open_transport(settings.broker_url, connection_name="chorus-coordinator")
        async with with_recording(connection, settings) as transport:
            # The strategy loads its sentence encoder (seconds; tens of them for a first ONNX export): only
            # once the broker has let the coordinator in, so that a wrong URL or password shows at once.
            coordinator = build_coordinator(settings, transport, store=store, prompts=prompts)
            log.debug("service_process_prepared", frozen_objects=prepare_service_process())
            with StopSignals(coordinator.request_stop, service="chorus-coordinator") as signals:
                await coordinator.run()
            return signals.interrupted
    finally:
        store.close()


def print_status(state_path: Path) -> None:
    if not state_path.is_file():
        raise ChorusError(f"no state database at {state_path}; has the coordinator run yet?")
    store = CoordinatorStore(state_path)
    try:
        rows = [("round", "status", "shard", "outcome", "answered", "labelled", "reason")]
        for round_row in store.rounds():
            summary = None if round_row.summary is None else decode_reply(round_row.summary)
            closings = {c.shard_id: c for c in store.closings(round_row.round_id)}
            outcomes = {o.shard_id: o for o in summary.shards} if isinstance(summary, RoundClosed) else {}
            if not closings:
                rows.append((str(round_row.round_id), round_row.status, "-", "open", "-", "-", ""))
            for shard_id, closing in sorted(closings.items()):
                labelled = outcomes[shard_id].labelled if shard_id in outcomes else "-"
                rows.append(
                    (
                        str(round_row.round_id),
                        round_row.status,
                        str(shard_id),
                        closing.status,
                        str(len(closing.answered)),
                        str(labelled),
                        closing.reason,
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        members = store.members()
        print(f"\n{len(members)} members: " + ", ".join(m.participant_id for m in members))
        print(f"run {store.run_id}")
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
