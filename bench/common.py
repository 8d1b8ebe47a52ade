"""Shared by the benchmarks: the machine description and writing results (JSON + Markdown)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Platform, CPU model and count, memory, Python, torch, RabbitMQ, and the load average now."""
    memory_mib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_mib = int(line.split()[1]) // 1024
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    from broker.definitions import RABBITMQ_VERSION

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_mib": memory_mib,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "rabbitmq": RABBITMQ_VERSION,
        "gpu": _gpu_name(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _gpu_name() -> str | None:
    """The first CUDA GPU torch sees, by name; None on a machine without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of `packages` (None where one is absent)."""
    return {package: _version(package) for package in packages}


def machine_line(host: Mapping[str, Any]) -> str:
    return (
        f"Machine: {host['platform']}; {host['cpus']} × {host['cpu']}; {host['memory_mib']} MiB; "
        f"{'GPU ' + host['gpu'] + '; ' if host.get('gpu') else ''}"
        f"Python {host['python']}; torch {host['torch']}; RabbitMQ {host['rabbitmq']}; "
        f"load average at start {host['load_average_at_start']} (shared, noisy machine)."
    )


def timed(function: Callable[[], T]) -> tuple[T, float, float]:
    """The result, wall seconds and CPU seconds of this process (all threads)."""
    started, started_cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - started, time.process_time() - started_cpu


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib_of(pid: int) -> float:
    """Another process's peak resident memory (VmHWM); 0.0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_coordinator(config: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    """`chorus-coordinator run --config <config>` as its own process on broker `url`, logging (warnings
    and worse) to `log`, so that its memory and CPU are its own."""
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--log-level",
                "warning",
                "run",
                "--config",
                str(config),
            ],
            env=os.environ | {"CHORUS_BROKER_URL": url},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def write_results(name: str, report: dict[str, Any], markdown: str, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def show_results(name: str, report: dict[str, Any], lines: Sequence[str], *, write: bool) -> None:
    """Print the Markdown lines; with `write`, also save them and the report as `<name>.{md,json}`."""
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if write:
        write_results(name, report, markdown)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines
