# make demo: set up .venv, build sample shards, score them.   make test: set up .venv, run every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install demo test test-fast slurm-up slurm-down bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@test -f $(DEMO)/shards/sample-000003.idx || \
		$(PY) -m jobs.make_shards synthetic=400 shard_size=100 prefix=sample output_dir=$(DEMO)/shards
	$(PY) -m jobs.score data=sample output.dir=$(DEMO)/scores model.weights=null batch_size=64 output.overwrite=true
	@echo "Parquet: $(DEMO)/scores/*.parquet   metrics: $(DEMO)/scores/metrics/rank-00000.json"

# The whole suite, Slurm integration tests included (slurm/cluster.sh starts a one-node cluster).
test: install
	$(PY) -m pytest -ra

test-fast: install
	$(PY) -m pytest -ra -m "not slurm"

clean:
	rm -rf $(DEMO) outputs multirun .pytest_cache
