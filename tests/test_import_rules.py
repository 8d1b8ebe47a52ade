"""Layering rules, checked in a fresh interpreter: what importing one side drags in with it."""

from __future__ import annotations

import json
import subprocess
import sys


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
