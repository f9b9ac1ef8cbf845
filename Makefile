# Two commands for a newcomer:  make book   (the main job)   and   make test.
# Both create .venv (unless a virtual environment is already active), install requirements.txt
# into it once (again whenever requirements.txt or pyproject.toml change), then do their job.
# `make book` executes every chapter at `smoke` (minutes on 2 cores, no GPU needed; the prose rests on the
# recorded runs the chapters display) and ends by printing how to execute at `cpu` or `gpu` and how long
# the planner says each takes. make book PRESET=cpu (or gpu, auto, paper) executes at that budget.
PRESET ?= smoke
# The project's CI and developer machines keep CIFAR-10 in ../shared/data; readers download it.
METABOOK_DATA ?= $(if $(wildcard ../shared/data/cifar10.npz),$(abspath ../shared/data),)
export METABOOK_DATA

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
STAMP := $(VIRTUAL_ENV)/.metabook-installed
else
PY := .venv/bin/python
STAMP := .venv/.metabook-installed
endif

.PHONY: book test setup student clean

book: $(STAMP)
	$(PY) -m metabook build --preset $(PRESET)

test: $(STAMP)
	$(PY) -m pytest

setup: $(STAMP)

student: $(STAMP)
	$(PY) -m metabook student _build/student

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv .venv || { echo "could not create .venv: install python3-venv (Debian/Ubuntu) or activate a virtual environment"; exit 1; }
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

clean:
	rm -rf _build
