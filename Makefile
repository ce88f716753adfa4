# The README's two quickstart commands, plus the checks CI runs.
#   make demo   the whole chain on the tiny model, offline, on a CPU
#   make test   lint, unit tests, end-to-end runs (Snakemake, SLURM, browser)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
# System packages the end-to-end tests drive: a browser, and a real SLURM cluster with accounting.
APT_PACKAGES := chromium slurmctld slurmd slurm-client munge slurmdbd mariadb-server

.PHONY: demo test lint dryrun unit e2e bench system-deps clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: the CPU wheel on this machine, never a multi-GB CUDA build by accident.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$*]'
	touch $@

# Jobs run `vicunaflow ...` in a shell: the venv's bin goes first on their PATH.
RUN := PATH=$(abspath $(BIN)):$$PATH

demo: $(VENV)/.installed-workflow,train,serve
	$(RUN) $(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES) --show-failed-logs
	@$(BIN)/python scripts/demo_summary.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/snakemake --lint --configfile config/demo.yaml

dryrun: $(VENV)/.installed-dev
	$(RUN) $(BIN)/snakemake -n vicuna-13b-all-v1.1 --quiet rules

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# One pytest worker per core, each taking whole files (a file's tests share its fixtures and, for the SLURM
# and install tests, its daemons and folders): 15.7 against 25.3 minutes of tests on the 2-core CI machine.
test: lint dryrun system-deps
	VICUNAFLOW_REQUIRE_E2E=1 $(RUN) $(BIN)/pytest -q -ra -n $(CORES) --dist loadfile --durations=15

bench: $(VENV)/.installed-dev
	$(RUN) $(BIN)/python bench/bench_convert_merge.py

clean:
	rm -rf pyllama_data llama-*-hf vicuna-*-delta-v1.1 vicuna-*-all-v1.1 fine_tuning_output data/tokenized \
		results logs benchmarks report.html .snakemake .staging
