# The two commands of the README: `make book` and `make test`. Each creates .venv when it is
# missing and (re)installs the project when pyproject.toml changed, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-pyproject
PROFILE ?= ci
PYTEST_ARGS ?=

.PHONY: install book check-book test reliability lab clean help

help:
	@echo "make book   execute every notebook with the '$(PROFILE)' profile and build book/_build/html"
	@echo "make check-book  open every page of book/_build/html in headless Chromium; fail on broken images,"
	@echo "            missing figures, tracebacks and progress-bar walls (installs Debian's chromium if missing)"
	@echo "make test   unit + integration tests and every notebook with the 'smoke' profile"
	@echo "make reliability  the catalogue of bad input (tests/reliability): one table row per case"
	@echo "make lab    JupyterLab on notebooks/ (the .py files open as notebooks via Jupytext)"
	@echo "make clean  remove executed notebooks, the HTML book and caches (keeps .venv and workspace/)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

book: install
	$(PY) -m mlip_core.book --profile $(PROFILE) --build
	@echo "The book: book/_build/html/index.html"

# Chromium (chromium, chromium-browser or google-chrome on PATH, or $CHROMIUM) is installed from Debian
# when none is found; sudo only when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
check-book: install
	@$(PY) -c "from mlip_core.check_book import find_chromium; raise SystemExit(find_chromium() is None)" \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	$(PY) -m mlip_core.check_book

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

reliability: install
	$(PY) tests/reliability/report.py

lab: install
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf book/_build book/notebooks .pytest_cache
	find . -path ./$(VENV) -prune -o -name '__pycache__' -type d -prune -exec rm -rf {} +
	find notebooks -name '*.ipynb' -delete
