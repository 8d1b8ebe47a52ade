"""Layering rules, checked in a fresh interpreter: what importing one side drags in with it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules_loaded_by(*modules: str) -> list[str]:
    """Every module in sys.modules after importing `modules` in a new interpreter."""
    code = "import json, sys\n"
    code += "".join(f"import {module}\n" for module in modules)
    code += "print(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_participant_imports_nothing_from_the_coordinator() -> None:
    loaded = modules_loaded_by("participant.service", "participant.cli")
    assert [m for m in loaded if m == "coordinator" or m.startswith("coordinator.")] == []


REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("schemas", "common", "broker", "coordinator", "participant", "federation")


def imported_by(package: str) -> dict[str, set[str]]:
    """Source file -> full names of the modules it imports, lazily imported ones included (read from
    the source, not from running it)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        path: sorted(n for n in names if n.split(".")[0] in forbidden)
        for path, names in imported_by(package).items()
        if any(n.split(".")[0] in forbidden for n in names)
    }


def test_participant_source_names_no_coordinator_module_even_lazily() -> None:
    assert offenders("participant", ("coordinator",)) == {}


def test_nothing_shipped_imports_the_benchmarks() -> None:
    for package in SHIPPED:
        assert offenders(package, ("bench",)) == {}, package


def test_shared_code_imports_neither_side() -> None:
    for package in ("schemas", "common"):
        assert offenders(package, ("coordinator", "participant", "federation", "broker")) == {}, package


def test_only_the_amqp_transport_imports_aio_pika() -> None:
    for package in SHIPPED:
        found = offenders(package, ("aio_pika", "aiormq"))
        assert all(path.startswith("broker/amqp") for path in found), found


def test_the_coordinator_service_and_cli_load_without_torch() -> None:
    loaded = modules_loaded_by("coordinator.service", "coordinator.cli", "coordinator.strategies")
    assert [m for m in loaded if m.split(".")[0] in ("torch", "transformers", "peft")] == []


def test_loading_the_shipped_settings_imports_no_model_or_index_library() -> None:
    """A typo in a settings file is reported before anything heavy loads: the settings types check
    names and ranges themselves, and a strategy's or learner's name is checked where it is built."""
    code = (
        "import json, sys\nfrom pathlib import Path\n"
        "from coordinator.settings import load_coordinator_settings\n"
        "from participant.settings import load_participant_settings\n"
        "from federation.config import load_run_config\n"
        "load_coordinator_settings(Path('examples/coordinator.toml'), env={})\n"
        "load_participant_settings(Path('examples/participant.toml'), env={})\n"
        "load_run_config(Path('examples/demo.toml'))\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = json.loads(result.stdout.splitlines()[-1])
    heavy = ("torch", "transformers", "peft", "opacus", "hnswlib", "sentence_transformers", "onnxruntime")
    assert [m for m in loaded if m.split(".")[0] in heavy] == []


def names_a_test_module(module: str) -> bool:
    """`conftest`, `test_x` (or either under `tests.`): modules pytest loads itself, not helpers."""
    parts = module.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and (parts[0] == "conftest" or parts[0].startswith("test_"))


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    found = {
        path: sorted(name for name in names if names_a_test_module(name))
        for path, names in imported_by("tests").items()
    }
    assert {path: names for path, names in found.items() if names} == {}


def test_helpers_live_in_tests_support() -> None:
    """tests/ holds conftest.py and test modules; what they share is in the tests/support package."""
    tests = REPO / "tests"
    helpers = [p.name for p in tests.glob("*.py") if not names_a_test_module(p.stem)]
    assert helpers == []
    assert (tests / "support" / "__init__.py").is_file()
    assert [p.name for p in (tests / "support").glob("test_*.py")] == []  # pytest would collect them
