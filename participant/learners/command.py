"""The `command` kind: a black box given as an external program, prompt on stdin, answer on stdout.

The generation parameters and prompt id arrive as environment variables (`CHORUS_PROMPT_ID`,
`CHORUS_MAX_NEW_TOKENS`, `CHORUS_TEMPERATURE`, `CHORUS_TOP_P`, `CHORUS_SEED`). No torch here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from participant.learner import LearnerError
from participant.learners.black_box import PerPromptLearner
from schemas.messages import GenerationParams

if TYPE_CHECKING:
    from participant.settings import ParticipantSettings


class CommandLearner(PerPromptLearner):
    """A black box given as an external program: prompt on stdin, answer on stdout, one run per prompt.

    `command` is an argv list, or a string split like a shell would (no shell runs it). A non-zero exit,
    a timeout or a missing program raises `LearnerError` naming the prompt and showing stderr's end.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        model_id: str,
        timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        concurrency: int = 1,
    ) -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise LearnerError("CommandLearner needs a command to run")
        if timeout_s <= 0 or concurrency < 1:
            raise LearnerError(f"need timeout_s > 0 and concurrency >= 1, got {timeout_s}, {concurrency}")
        self.model_id = model_id
        self.timeout_s = timeout_s
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.concurrency = concurrency

    def answer(self, prompt_id: str, prompt: str, params: GenerationParams) -> str:
        env = {**(self.env if self.env is not None else os.environ), **_parameter_env(prompt_id, params)}
        try:
            finished = subprocess.run(
                self.argv,
                input=prompt,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=self.timeout_s,
                env=env,
                cwd=self.cwd,
                check=False,
            )
        except FileNotFoundError as e:
            raise LearnerError(
                f"{self.model_id}: command not found: {self.argv[0]!r} (is it installed?)"
            ) from e
        except subprocess.TimeoutExpired as e:
            raise LearnerError(
                f"{self.model_id}: {self.argv[0]} timed out after {self.timeout_s:g}s on prompt {prompt_id!r}"
            ) from e
        if finished.returncode != 0:
            raise LearnerError(
                f"{self.model_id}: {self.argv[0]} exited with status {finished.returncode} on prompt "
                f"{prompt_id!r}; stderr: {finished.stderr.strip()[-500:] or '(empty)'}"
            )
        return finished.stdout


def build(settings: ParticipantSettings) -> CommandLearner:
    command = settings.command or []
    return CommandLearner(
        command,
        model_id=settings.model_id or command_model_id(command),
        timeout_s=settings.command_timeout_seconds,
        cwd=Path(settings.command_dir) if settings.command_dir else None,
    )


# Programs that run a script named by a later argument: the script, not the interpreter, names the model.
INTERPRETER = re.compile(
    r"^(python|pypy|node|deno|bun|ruby|perl|php|bash|sh|zsh|lua|julia|Rscript|java|env)[0-9.]*(\.exe)?$"
)


def command_model_id(argv: Sequence[str]) -> str:
    """A black box's default model id: the program's name, or the script's for an interpreter
    (``["python3", "-u", "answer.py"]`` is "answer.py"; ``["ollama", "run", "llama3"]`` is "ollama")."""
    names = [Path(arg).name for arg in argv]
    if not names:
        return "command"
    if INTERPRETER.match(names[0]):
        for arg, name in zip(argv[1:], names[1:], strict=True):
            if not arg.startswith("-") and "=" not in arg and not INTERPRETER.match(name):
                return name
    return names[0]


def _parameter_env(prompt_id: str, params: GenerationParams) -> dict[str, str]:
    return {
        "CHORUS_PROMPT_ID": prompt_id,
        "CHORUS_MAX_NEW_TOKENS": str(params.max_new_tokens),
        "CHORUS_TEMPERATURE": str(params.temperature),
        "CHORUS_TOP_P": str(params.top_p),
        "CHORUS_SEED": str(params.seed),
    }
