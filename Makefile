# ALIP on Ray. Two commands do all set-up on a fresh machine:
#   make demo   # the whole pipeline end to end on the built-in world (local Ray, local files)
#   make test   # the test suite (slow end-to-end tests included, as in CI)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# make test runs the suite on this many pytest-xdist workers (2 cores here: measured in issue 24)
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)

.PHONY: setup demo test test-fast test-cluster bench ofa-env clean

setup: $(STAMP)

# (Re)install whenever pyproject.toml changes; pins live there.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(PY) -m alip.demo

test: setup
	@bash scripts/ensure_chromium.sh
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# The simulated-cluster tests alone (ray.cluster_utils.Cluster: node loss, drains, chaos trials).
CLUSTER_TESTS := tests/test_caption_cluster.py tests/test_caption_pool.py tests/test_chaos_caption.py \
                 tests/test_pretrain_elastic.py tests/test_spot_watch.py
test-cluster: setup
	$(VENV)/bin/pytest -q --durations=15 $(CLUSTER_TESTS)

# Ratio benchmarks (minutes each on 2 CPUs; run on a quiet machine). See bench/*.py headers.
bench: setup
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_ingest.py
	$(PY) bench/bench_caption.py --n 2000 --rounds 2
	$(PY) bench/bench_serve.py --requests 6
	$(PY) bench/bench_learning.py
	$(PY) bench/bench_chaos.py
	$(PY) bench/chaos_caption.py --trials 50
	$(PY) bench/bench_scale.py --shards 200 1000

# The isolated OFA environment (transformers 4.x + ModelScope); the OFA test builds it when missing.
ofa-env:
	bash scripts/setup_ofa_env.sh

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
