# `make demo` and `make test` each do all set-up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-slurm setup data dry-run clean-results help

help:
	@echo "make demo       set up, then run the whole pipeline on the tiny default (configs/default.yaml)"
	@echo "make test       set up, then run the fast tests"
	@echo "make test-slow  set up, then run the slow end-to-end tests"
	@echo "make test-slurm set up, then run the smoke DAG on a single-node SLURM cluster on localhost (root)"
	@echo "make dry-run    show what Snakemake would run (CONFIG=... to choose a config)"
	@echo "make setup      create $(VENV) and install the package (done by demo/test)"
	@echo "make data       install Fashion-MNIST (Debian package dataset-fashion-mnist)"

demo: setup data
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)

test: setup data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup data
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# Installs slurmctld/slurmd/munge (apt) and the executor plugin into .slurm-plugin/ when missing;
# skips when not root (fails instead under CI=true, as in .ci/run). See README, "Running on a SLURM cluster".
test-slurm: setup data
	$(BIN)/python -m pytest -m slurm $(PYTEST_ARGS)

dry-run: setup
	$(BIN)/snakemake -n --cores $(CORES) --configfile $(CONFIG)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

data:
	@if ls $(FMNIST_DIR)/*-ubyte.gz >/dev/null 2>&1; then \
		echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Fashion-MNIST from the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST_DIR). Get it with one of:"; \
		echo "  sudo apt-get install dataset-fashion-mnist      (Debian/Ubuntu)"; \
		echo "  or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
		echo "  t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from the Fashion-MNIST"; \
		echo "  GitHub repository into a folder and run: make FMNIST_DIR=<folder> ..."; \
		echo "  (then set dataset.path in your config to that folder)"; \
		exit 1; \
	fi

clean-results:
	rm -rf results reports
