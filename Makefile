# Entry points. Every target sets up what it needs: the venv (pinned requirements.txt)
# and, for the lab, a Docker engine (installed from Debian's packages when missing).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(abspath ansible.cfg)
export ANSIBLE_FORCE_COLOR ?= 0
export PY_COLORS ?= 0

# Molecule scenarios in the order `make test` runs them: role scenarios first, then
# the whole deployment end to end, then day-2 operations on it.
SCENARIOS ?= docker_engine nvidia_container_toolkit curve_certificates swarm_network default day2
PLAYBOOKS := site.yml $(wildcard playbooks/*.yml)
INVENTORIES := inventory/production inventory/lab

.PHONY: help venv engine lab lab-down test lint syntax unit molecule bench clean

help:  ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed  ## Create the virtualenv with the pinned tools

engine:  ## Make sure a Docker engine answers (installs docker.io on Debian/Ubuntu as root)
	scripts/ensure-docker-engine

# Extra lab hosts (a third machine type): make lab LAB_INVENTORY=inventory/lab-examples/pc3.yml
LAB_INVENTORY ?=
LAB_INVENTORIES := -i inventory/lab $(if $(LAB_INVENTORY),-i $(LAB_INVENTORY))

lab: venv engine  ## Bring up the lab (two hosts; more with LAB_INVENTORY=<file>) and deploy site.yml on it
	ansible-playbook $(LAB_INVENTORIES) playbooks/lab-up.yml
	ansible-playbook $(LAB_INVENTORIES) site.yml

lab-down: venv engine  ## Remove every lab container, volume and network
	ansible-playbook playbooks/lab-down.yml

test: lint syntax unit molecule  ## Lint, syntax checks, unit tests and every molecule scenario on the lab

lint: venv  ## yamllint and ansible-lint (production profile)
	yamllint --strict .
	ansible-lint --profile production

syntax: venv  ## Syntax-check every playbook against both inventories
	@for inv in $(INVENTORIES); do for pb in $(PLAYBOOKS); do \
		echo "syntax-check $$pb ($$inv)"; \
		ansible-playbook --syntax-check -i $$inv $$pb >/dev/null; \
	done; done

unit: venv  ## Unit tests of the modules and the stand-in agent (real ZeroMQ sockets)
	pytest -q tests/unit

# CI shows only the end of the output: a failed scenario ends with its failed tests.
molecule: venv engine  ## Run the molecule scenarios on the lab
	@mkdir -p .cache && rm -f .cache/verify-*.log
	@for s in $(SCENARIOS); do echo "== molecule test -s $$s"; \
		molecule test -s $$s || { scripts/verify-summary "$$s"; exit 1; }; done
	@# Scenarios keep the lab registry for the next one (molecule/resources/destroy.yml).
	ansible-playbook playbooks/lab-down.yml

# Against an earlier commit on the same machine: make bench BENCH_ARGS="--skip-module --against <ref>"
BENCH_ARGS ?=
bench: venv engine  ## Benchmarks (module fan-out, lab deploy times)
	$(BIN)/python scripts/bench $(BENCH_ARGS)

clean: lab-down  ## Remove the lab and local caches (not the venv)
	rm -rf .cache
