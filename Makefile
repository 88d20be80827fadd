# make demo: set up .venv, build sample shards, score them.   make test: set up .venv, run every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install demo test test-fast test-slurm test-without-dali slurm-up slurm-down bench clean chromium

# EXTRAS: cuda13 (DALI for CUDA 13; cuda12 for older drivers), s3, models (timm, open_clip), bench (plots), dev.
EXTRAS ?= cuda13,s3,models,bench,dev

# Byte-compiled at install (a minute here): where PYTHONDONTWRITEBYTECODE=1, as on this machine, Python
# would otherwise compile torch & co. again in every process.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@test -f $(DEMO)/shards/sample-000003.idx || \
		$(PY) -m jobs.make_shards synthetic=400 shard_size=100 prefix=sample output_dir=$(DEMO)/shards
	$(PY) -m jobs.score data=sample output.dir=$(DEMO)/scores model.weights=null batch_size=64 output.overwrite=true
	@echo "Parquet: $(DEMO)/scores/*.parquet   metrics: $(DEMO)/scores/_metrics/rank-00000.json"

# The whole suite, Slurm integration tests included: tests/test_slurm.py starts its own one-node
# cluster (slurm/cluster.sh, as root; own state folder and ports) and stops it at the end. The report's
# screenshot test needs Debian's chromium, installed here when missing (as root). Two pytest workers:
# many tests wait on processes of their own (Slurm, signals, S3); the Slurm ones share one worker.
TEST_WORKERS ?= 2
test: install chromium
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadgroup

chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the screenshot test will be skipped"

test-fast: install
	$(PY) -m pytest -ra -m "not slurm"

test-slurm: install
	$(PY) -m pytest -ra -m slurm

# The suite as on a machine without NVIDIA DALI: its imports are blocked; DALI's own tests skip.
test-without-dali: install
	PYTHONPATH=tests/without_dali $(PY) -m pytest -ra -m "not slurm"

# A cluster to try slurm/score.sbatch by hand: `make slurm-up`, then `. /tmp/shardscore-slurm/env.sh`.
slurm-up:
	bash slurm/cluster.sh start

slurm-down:
	bash slurm/cluster.sh stop

clean:
	rm -rf $(DEMO) outputs multirun .pytest_cache
