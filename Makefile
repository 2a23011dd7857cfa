# The two commands of the README: `make book` and `make test`. Each creates .venv when it is
# missing and (re)installs the project when pyproject.toml changed, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-pyproject
PROFILE ?= ci
PYTEST_ARGS ?=

.PHONY: install book check-book test reliability lab check-lab clean help

help:
	@echo "make book   execute every notebook with the '$(PROFILE)' profile and build book/_build/html"
	@echo "make check-book  open every page of book/_build/html in headless Chromium; fail on broken images,"
	@echo "            missing figures, tracebacks and progress-bar walls (installs Debian's chromium if missing)"
	@echo "make test   unit + integration tests and every notebook with the 'smoke' profile"
	@echo "make reliability  the catalogue of bad input (tests/reliability): one table row per case"
	@echo "make lab    JupyterLab on notebooks/; a double-click opens a chapter (.py) as a notebook (Jupytext)"
	@echo "make check-lab  open a chapter in that lab in headless Chromium: notebook cells, the venv's kernel"
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

# The project's JupyterLab defaults (chapters open as "Jupytext Notebook", not in the text editor) go
# into the venv's application settings, overrides.d/: merged before a user's overrides.json, beaten by
# Settings > Document Manager. JUPYTER_PREFER_ENV_PATH: the venv's python3 kernel over one in ~/.local.
LAB_SETTINGS := $(or $(JUPYTERLAB_DIR),$(VENV)/share/jupyter/lab)/settings/overrides.d/mlip-book.json
$(LAB_SETTINGS): jupyter/lab/settings/overrides.d/mlip-book.json | $(PY)
	mkdir -p $(@D) && cp $< $@

lab: install $(LAB_SETTINGS)
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter lab --notebook-dir=notebooks

check-lab: install
	@$(PY) -c "from mlip_core.check_book import find_chromium; raise SystemExit(find_chromium() is None)" \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	$(PY) -m mlip_core.check_lab

clean:
	rm -rf book/_build book/notebooks .pytest_cache
	find . -path ./$(VENV) -prune -o -name '__pycache__' -type d -prune -exec rm -rf {} +
	find notebooks -name '*.ipynb' -delete
