"""`chorus-run init DIR`: a federation to start from, the way `flwr new` starts a Flower app.

    chorus-run init DIR [--sites N] [--model SPEC] [--embedder NAME] [--federation NAME]

writes, for N sites (3 by default):

    DIR/README.md                     how to run it: in one process, and by hand over RabbitMQ
    DIR/chorus-run.toml               the whole federation for `chorus-run`
    DIR/coordinator/coordinator.toml  `chorus-coordinator` settings, and the public prompts beside it
    DIR/site-K/participant.toml       `chorus-participant` settings of site K, its private and test data

Each folder is what one machine needs, with paths relative to it. The sample data are small made-up
instruction sets, `{"prompt", "response"}` JSONL, one topic per site (non-IID, as real sites are); the
public prompts ask about every topic. Replace them with your own and keep the keys.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.exits import EXIT_OK, EXIT_USAGE

RUN_CONFIG = "chorus-run.toml"
COORDINATOR_DIR = "coordinator"
PROMPTS_FILE = "public_prompts.jsonl"
PRIVATE_FILE = "private.jsonl"
# participant.models.SMOLLM2_SPEC, named here so that `init` does not wait for torch to import
SMOLLM2_SPEC = "smollm2-135m-instruct"
TEST_FILE = "test.jsonl"
PRIVATE_PER_SITE = 24
TEST_PER_SITE = 6
PUBLIC_PROMPTS = 24  # three rounds of eight before any repeats

Example = tuple[str, str]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("early", "late"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
    ("high", "low"), ("old", "new"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("thick", "thin"), ("near", "far"), ("clean", "dirty"), ("first", "last"), ("up", "down"),
    ("inside", "outside"), ("cheap", "expensive"), ("long", "short"), ("sweet", "sour"),
    ("awake", "asleep"), ("true", "false"), ("win", "lose"), ("push", "pull"), ("buy", "sell"),
    ("give", "take"), ("left", "right"), ("before", "after"), ("start", "finish"), ("day", "night"),
    ("north", "south"), ("east", "west"),
]  # fmt: skip
WORDS = [
    "river", "candle", "planet", "garden", "window", "pencil", "market", "forest", "bridge", "rocket",
    "island", "button", "ladder", "winter", "summer", "silver", "orange", "mirror", "castle", "dragon",
    "pepper", "violin", "anchor", "basket", "circle", "desert", "engine", "falcon", "guitar", "harbor",
    "jungle", "kettle", "lemon", "meadow", "nickel", "oyster", "parrot", "quartz", "rabbit", "saddle",
    "tunnel", "valley", "walnut", "yellow", "zipper", "beacon", "cactus", "dinner", "feather", "goblet",
    "helmet", "insect", "jacket", "kitten", "lantern", "magnet", "needle", "orchid", "puzzle", "ribbon",
]  # fmt: skip


def _sums(rng: random.Random) -> Example:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _opposites(rng: random.Random) -> Example:
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opposite}'."


def _reversed(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return f"Spell the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."


def _plurals(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    plural = word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    return f"What is the plural of '{word}'?", f"The plural of '{word}' is '{plural}'."


def _products(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


TOPICS: list[tuple[str, Callable[[random.Random], Example]]] = [
    ("sums", _sums),
    ("opposites", _opposites),
    ("reversed words", _reversed),
    ("plurals", _plurals),
    ("products", _products),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-run init",
        description="Write a federation to start from: coordinator and participant settings for N sites, "
        "sample data, a chorus-run config, and a README with the commands to run it.",
    )
    parser.add_argument("directory", type=Path, help="where to write it (must not exist or be empty)")
    parser.add_argument("--sites", type=int, default=3, help="number of participants (default 3)")
    parser.add_argument(
        "--model",
        default=SMOLLM2_SPEC,
        help=f"every site's model: {SMOLLM2_SPEC} (default), a local Hugging Face model directory, "
        "or tiny-llama / tiny-gpt2 (random 2-layer models: a try-out in seconds, no learning)",
    )
    parser.add_argument(
        "--embedder",
        default="minilm",
        help="the coordinator's sentence encoder: minilm (default), minilm-onnx, or hashing "
        "(no model to load; for a try-out)",
    )
    parser.add_argument("--federation", default="my-federation", help="the federation's name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.sites <= 100:
        parser.error(f"--sites must be 1 to 100, got {args.sites}")
    target: Path = args.directory
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        print(f"chorus-run init: error: {target} already exists and is not empty", file=sys.stderr)
        return EXIT_USAGE
    sites = [f"site-{k}" for k in range(1, args.sites + 1)]
    write_federation(target, sites, model=args.model, embedder=args.embedder, federation=args.federation)
    print(f"wrote a federation of {len(sites)} sites to {target}; next:")
    print(f"  chorus-run {target / RUN_CONFIG} --results {target / 'results'}")
    print(f"  (or by hand over RabbitMQ: see {target / 'README.md'})")
    return EXIT_OK


def write_federation(
    target: Path, sites: Sequence[str], *, model: str, embedder: str, federation: str
) -> None:
    rng = random.Random(0)
    public: list[str] = []
    seen: set[str] = set()
    for index, site in enumerate(sites):
        _, make = TOPICS[index % len(TOPICS)]
        examples = _distinct(make, rng, PRIVATE_PER_SITE + TEST_PER_SITE, taken=seen)
        seen.update(prompt for prompt, _ in examples)
        _write_examples(target / site / PRIVATE_FILE, examples[:PRIVATE_PER_SITE])
        _write_examples(target / site / TEST_FILE, examples[PRIVATE_PER_SITE:])
        (target / site / "participant.toml").write_text(
            _participant_toml(federation, site, model), encoding="utf-8"
        )
    topics = TOPICS[: min(len(sites), len(TOPICS))]
    for _, make in topics:
        per_topic = -(-PUBLIC_PROMPTS // len(topics))
        public.extend(prompt for prompt, _ in _distinct(make, rng, per_topic, taken=seen))
    _write_jsonl(
        target / COORDINATOR_DIR / PROMPTS_FILE,
        [{"prompt_id": f"p{i:03d}", "prompt": prompt} for i, prompt in enumerate(public)],
    )
    (target / COORDINATOR_DIR / "coordinator.toml").write_text(
        _coordinator_toml(federation, sites, embedder), encoding="utf-8"
    )
    (target / RUN_CONFIG).write_text(_run_toml(federation, sites, model, embedder), encoding="utf-8")
    (target / "README.md").write_text(_readme(target, sites), encoding="utf-8")


def _distinct(
    make: Callable[[random.Random], Example], rng: random.Random, count: int, taken: set[str]
) -> list[Example]:
    """Up to `count` examples of one topic whose prompts are not in `taken` nor repeated."""
    found: dict[str, str] = {}
    for _ in range(count * 50):
        prompt, response = make(rng)
        if prompt not in taken:
            found.setdefault(prompt, response)
        if len(found) == count:
            break
    return list(found.items())


def _write_examples(path: Path, examples: Sequence[Example]) -> None:
    _write_jsonl(path, [{"prompt": prompt, "response": response} for prompt, response in examples])


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _round_table(sites: Sequence[str]) -> str:
    return (
        "rounds = 3\n"
        "prompts_per_round = 8\n"
        "shards = 2\n"
        f"min_participants = {len(sites)}     # a round opens once this many sites have joined\n"
        "quorum = 1.0                # a float is a share of the active sites: wait for all of them\n"
        "deadline_seconds = 600.0\n"
        "grace_seconds = 5.0\n"
    )


def _coordinator_toml(federation: str, sites: Sequence[str], embedder: str) -> str:
    return (
        "# chorus-coordinator settings. The broker URL (with its password) comes from CHORUS_BROKER_URL,\n"
        "# not from the command line, where `ps` would show it. Paths are against this file's folder.\n"
        f'federation = "{federation}"\n'
        f'prompts_path = "{PROMPTS_FILE}"   # JSONL {{"prompt_id", "prompt"}}: what every site answers\n'
        'state_path = "state/coordinator.sqlite3"\n'
        f"roster = {json.dumps(list(sites))}   # only these may join\n"
        "\n[round]\n"
        + _round_table(sites)
        + "\n[generation]\nmax_new_tokens = 32\ntemperature = 0.0           # greedy\n"
        "\n[consensus]\n"
        f'embedder = "{embedder}"\n'
        "min_confidence = 0.5        # below this mean similarity a prompt gets no label\n"
    )


def _participant_toml(federation: str, site: str, model: str) -> str:
    return (
        f"# chorus-participant settings of {site}. The broker URL (with this site's password) comes from\n"
        "# CHORUS_BROKER_URL, not the command line. Paths are against this file's folder.\n"
        + _commented(
            (f'federation = "{federation}"', ""),
            (f'participant_id = "{site}"', ""),
            (f'model = "{model}"', "or the path of a local Hugging Face model directory"),
            ('state_dir = "state"', "checkpoints: `chorus-participant export` reads them"),
            (f'private_data = "{PRIVATE_FILE}"', '{"prompt", "response"} JSONL: never leaves this site'),
            (f'test_data = "{TEST_FILE}"', "held out: scored after each round"),
            ("\n[train]", ""),
            ("rank = 8", ""),
            ("warmup_epochs = 1", "one pass over private data before round 1"),
            ("batch_size = 8", ""),
            ("private_examples_per_round = 16", "mixed with each round's pseudo-labels"),
        )
    )


def _commented(*lines: tuple[str, str]) -> str:
    width = max(len(line) for line, _ in lines) + 2
    return "".join(f"{line.ljust(width)}# {note}\n" if note else f"{line}\n" for line, note in lines)


def _run_toml(federation: str, sites: Sequence[str], model: str, embedder: str) -> str:
    participants = "".join(
        "\n[[participants]]\n"
        f'id = "{site}"\n'
        f'model = "{model}"\n'
        f'private_data = "{site}/{PRIVATE_FILE}"\n'
        f'test_data = "{site}/{TEST_FILE}"\n'
        for site in sites
    )
    return (
        "# The whole federation in one process: `chorus-run chorus-run.toml --results results`.\n"
        "# The same sites, data and budgets as coordinator/ and site-*/ describe for running by hand.\n"
        f'federation = "{federation}"\n'
        "rounds = 3\n"
        f'prompts_path = "{COORDINATOR_DIR}/{PROMPTS_FILE}"\n'
        f'embedder = "{embedder}"\n'
        "\n[generation]\nmax_new_tokens = 32\n"
        "\n[train]\nrank = 8\nwarmup_epochs = 1\nbatch_size = 8\nprivate_examples_per_round = 16\n"
        "\n[coordinator.round]\nprompts_per_round = 8\nshards = 2\n"
        "deadline_seconds = 600.0\ngrace_seconds = 5.0\n"
        "\n[coordinator.consensus]\nmin_confidence = 0.5\n" + participants
    )


def _readme(target: Path, sites: Sequence[str]) -> str:
    names = ",".join(sites)
    by_site = "\n".join(
        f'CHORUS_BROKER_URL="$(awk \'$1 == "{site}" {{print $2}}\' broker-urls.txt)" \\\n'
        f"  chorus-participant run --config {site}/participant.toml"
        for site in sites
    )
    return f"""# {target.name}: a Chorus federation of {len(sites)} sites

Written by `chorus-run init`. Each folder is what one machine needs: `coordinator/` the coordinator's
settings and the public prompts every site answers; `site-K/` a site's settings, its private data
(`private.jsonl`, never sent anywhere) and its held-out test data. The sample data are made up, one
topic per site; replace them with your own `{{"prompt", "response"}}` JSONL and keep the keys.

## In one process

```
chorus-run chorus-run.toml --results results
```

runs the coordinator and every site on the embedded broker and writes `results/` (a table per round,
`summary.json`, plots).

## By hand, over RabbitMQ

A local broker with a user per site; the URLs carry passwords, so they go to a file only you can
read, and into each process through `CHORUS_BROKER_URL` (a command line is visible to every user
of the machine in `ps`; a process's environment is not):

```
(umask 077 && chorus-broker up --dir .broker --participants {names} > broker-urls.txt)
CHORUS_BROKER_URL="$(head -n 1 broker-urls.txt)" chorus-coordinator run --config coordinator/coordinator.toml
```

and each site in its own terminal (on its own machine, with its own URL):

```
{by_site}
```

`chorus-coordinator status --config coordinator/coordinator.toml` shows the rounds; Ctrl-C stops a
process cleanly (exit status 130); `chorus-broker down --dir .broker` stops the broker.

## Afterwards

```
chorus-participant export --state-dir site-1/state --out site-1-model            # a PEFT adapter
chorus-participant export --state-dir site-1/state --out site-1-merged --merged  # a whole model
```
"""
