# Set up, test, run the demo. Every target installs what it needs first.
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup test demo demo-media bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/pytest -q

demo: setup
	bash scripts/demo.sh

demo-media: setup
	bash scripts/demo_media.sh

bench: setup
	$(VENV)/bin/python bench/e2e_latency.py

clean:
	rm -rf $(VENV) out models/demo models/demo-media
