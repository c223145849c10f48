# gathering_lab — two commands on a fresh machine: `make lab` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PORT ?= 8000

.PHONY: install lab test check lint typecheck pytest serve demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its extras

# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: install  ## open JupyterLab on the quick-start notebook
	$(VENV)/bin/jupyter trust notebooks/*.ipynb  # saved widgets render only in trusted notebooks
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/01_quickstart.ipynb

test: install check pytest  ## lint, type-check, then every test including the notebooks

check: lint typecheck

lint: install
	$(VENV)/bin/ruff check gathering_lab tests benchmarks
	$(VENV)/bin/ruff format --check gathering_lab tests

typecheck: install
	$(VENV)/bin/mypy

# Notebooks that need a local redis-server (05_cluster) run only where one is installed
# (.ci/run installs it); without it they are left out, and said so.
REDIS_NOTEBOOKS := notebooks/05_cluster.ipynb
HAVE_REDIS := $(shell command -v redis-server 2>/dev/null)
NOTEBOOKS := $(if $(HAVE_REDIS),$(wildcard notebooks/*.ipynb),$(filter-out $(REDIS_NOTEBOOKS),$(wildcard notebooks/*.ipynb)))

pytest: install
	@$(if $(HAVE_REDIS),,echo "note: redis-server not installed: $(REDIS_NOTEBOOKS) and the Redis tests are skipped (apt-get install redis-server)")
	$(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax -p no:cacheprovider

serve: install  ## run the standalone server on PORT (8000)
	$(VENV)/bin/gathering-lab serve --port $(PORT)

demo: install  ## publish demo traffic to the server on PORT
	$(VENV)/bin/gathering-lab demo --url ws://127.0.0.1:$(PORT)/ws/dashboard

bench: install  ## run the benchmarks (several minutes)
	$(PY) benchmarks/fanout.py
	$(PY) benchmarks/frame_bench.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/kernel_start.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
