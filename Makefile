# The few targets the README names. Each creates .venv on first use (Python >= 3.11 as python3).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test-deps demo test test-fast lint bench clean

setup: $(STAMP)

# The last step compiles the CRF's numba kernels into numba's cache once (~5 s) instead of in each CRF actor of a
# first run.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev]'
	$(BIN)/python -c "from pipeline.stages.crf_numba import warm_up; warm_up()"
	touch $(STAMP)

demo: setup
	$(BIN)/deeplab demo

# What the tests use besides Python: a second S3 implementation (npm s3rver, project-local) and, for the report's
# browser test, Debian's Chromium + ChromeDriver (installed when run as root with apt-get; elsewhere the browser test
# skips and says so).
S3RVER := infra/local/s3rver/node_modules/.bin/s3rver

test-deps: $(S3RVER)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver) >/dev/null; \
	  else echo "note: no chromium/chromedriver: the report's browser test will skip"; fi; \
	fi

$(S3RVER): infra/local/s3rver/package.json infra/local/s3rver/package-lock.json
	npm ci --prefix infra/local/s3rver --no-audit --no-fund --loglevel=error
	touch $(S3RVER)

# Two pytest workers, one test module each at a time (module fixtures such as ray_local stay whole): the
# integration tests wait on subprocesses, servers and Ray start-up about a third of the time, so two fill 2 cores.
# Modules go out in tests/conftest.py's order (longest first), not xdist's (most tests first).
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadfile --no-loadscope-reorder

test: setup test-deps
	$(BIN)/python -m pytest -q $(XDIST) --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not integration"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/crf.py
	$(BIN)/python bench/peer.py --images 200
	$(BIN)/python bench/dcnn.py
	$(BIN)/python bench/cores.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/input_size.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
