# The two set-up commands of README.md: `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests and the demo never reach out: no Hub, no analytics, wandb offline, caches in a temporary folder.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False WANDB_MODE=offline \
	TOKENIZERS_PARALLELISM=false

.PHONY: install demo test lint format lock

# The exact versions of requirements.lock, then tinylm itself without resolving anything afresh.
$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/tinylm train --preset demo --data synthetic --out runs/demo --overwrite
	$(OFFLINE) $(VENV)/bin/tinylm eval --checkpoint runs/demo/best_model.pt --data synthetic

test: $(STAMP)
	bash scripts/install-test-browser.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(OFFLINE) $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Resolve pyproject.toml's ranges afresh in a scratch environment and pin every package it installed.
# Local version labels (torch's +cpu) are dropped: which build of a version to take is the platform's choice.
LOCK_VENV := $(or $(TMPDIR),/tmp)/tinylm-lock-venv
LOCK_HEADER := \# Exact versions, written by make lock. Install: pip install -r requirements.lock && pip install --no-deps -e .
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	{ echo '$(LOCK_HEADER)'; $(LOCK_VENV)/bin/pip freeze --all --exclude-editable --exclude pip \
		| sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; } > requirements.lock.tmp
	! grep -nE ' @ |file:' requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	rm -rf $(LOCK_VENV)
