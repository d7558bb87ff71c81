# The two set-up commands of README.md: `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests and the demo never reach out: no Hub, no analytics, wandb offline, caches in a temporary folder.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False WANDB_MODE=offline \
	TOKENIZERS_PARALLELISM=false

.PHONY: install demo test lint format

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/tinylm train --preset demo --data synthetic --out runs/demo --overwrite
	$(OFFLINE) $(VENV)/bin/tinylm eval --checkpoint runs/demo/best_model.pt --data synthetic

test: $(STAMP)
	bash scripts/install-test-browser.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(OFFLINE) $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .
