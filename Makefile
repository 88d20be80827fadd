# make demo: set up .venv, build sample shards, score them.   make test: set up .venv, run every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install demo test test-fast test-slurm test-without-dali slurm-up slurm-down bench clean chromium

# EXTRAS: cuda13 (DALI for CUDA 13; cuda12 for older drivers), s3, models (timm, open_clip), engines (ONNX Runtime),
# bench (plots), dev; on a GPU node add tensorrt.
EXTRAS ?= cuda13,s3,models,engines,bench,dev

# uv installs what pip would, in a third of the time here (84 s cold against 233 s), byte-compiled:
# where PYTHONDONTWRITEBYTECODE=1, as on this machine, Python would otherwise compile torch & co. again
# in every process. uv does not read pip's configuration, so pip's index, find-links and constraint
# settings are handed to it, and like pip it may take a package from any of those indexes. Where uv
# cannot be had or fails, pip installs.
define PIP_CONFIG_AS_UV_ARGS
import subprocess, sys
rank = {"global": 0, "user": 1, "site": 2, ":env:": 3}
flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
        "find-links": "--find-links", "constraint": "--constraint"}
chosen = {}
for line in subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                           capture_output=True, text=True).stdout.splitlines():
    name, _, value = line.partition("=")
    scope, _, key = name.rpartition(".")
    if key in flag and rank.get(scope, 0) >= chosen.get(key, (-1, None))[0]:
        chosen[key] = (rank.get(scope, 0), value.strip("'\"").split())
print(" ".join(f"{flag[key]} {value}" for key, (_, values) in chosen.items() for value in values))
endef
export PIP_CONFIG_AS_UV_ARGS

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	{ $(VENV)/bin/pip install --quiet --disable-pip-version-check uv && \
	  $(VENV)/bin/uv pip install --python $(PY) --quiet --index-strategy unsafe-best-match --compile-bytecode \
	    $$($(PY) -c "$$PIP_CONFIG_AS_UV_ARGS") -c constraints.txt -e '.[$(EXTRAS)]'; } || \
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
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadgroup --durations=30

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
