"""`make bench-quality`: learning quality of semantic consensus against baselines, with statistical power.

    python -m bench.quality [bench/quality_grid.toml] [--quick] [--tasks ...] [--seeds ...] [--methods ...]

The grid (bench/quality_grid.toml) is tasks x seeds x methods: local-only, FedAvg over LoRA,
centralized, semantic consensus (the medoid recipe), the shipped recipe and a ceiling that trains on
the public prompts' true references, plus a junk-member run.
Every method is scored on the same test set by the NLL of the reference answers (every round) and by
ROUGE-L and embedding similarity of greedy answers after the last round (on a fixed subset);
differences to local-only and FedAvg get 95% intervals from a paired bootstrap over seeds and
prompts. Each finished run's result is saved at once under `<work>/runs/`, and a rerun skips it.

Modules: grid (the runs and their configs), methods (training each method), scoring (NLL and greedy
answers of saved checkpoints), results (per-run JSON, resume), execute (the loop, progress, ETA),
stats (the bootstrap), report/markdown/plots (the outputs), junk (FedAvg's refusal of a mixed federation).
"""

from bench.quality.cli import main

__all__ = ["main"]
