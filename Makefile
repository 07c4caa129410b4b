# Tessera — the single entry point. Every target sets up what it needs first and is idempotent.
#
#   make demo     set everything up and run Tessera on the bundled sample
#   make test     set everything up, run make lint, then every test (core tier, then the real-QGIS
#                 tier on this machine's QGIS 3.22, then on QGIS 3.40 and 3.44 in cached chroots,
#                 and the core tier again on 3.44's Python 3.14 with the numpy 2 lock)
#   make test-qgis-matrix  only the real-QGIS tier on the other QGIS versions (tools/qgis_matrix.sh)
#   make bench    CPU benchmarks: throughput, peak memory, int8, overlap, web sources (BENCHMARKS.md)
#   make bench-cluster  the Dask path (local:2) against the plain local run, at equal cores
#   make bench-gpu  the CUDA path on a GPU machine (benchmarks/bench_gpu.py; OUT=folder)
#   make train-default  retrain the shipped default model (DUBAI=folder, TRAIN_ARGS=...)
#   make package  build the installable plugin zip (dist/tessera-<version>.zip)
#   make deploy   install that zip into the local QGIS profile, using this checkout's venv
#   make lint     ruff (docstring and annotation rules on core/), mypy on core/, the house rules,
#                 the static Qt6 / QGIS 4 check of the adapters against PyQt6 (tools/check_qt6.py),
#                 flake8-qgis
#   make setup    only the set-up: QGIS, PostgreSQL/PostGIS from apt, the venv (.venv/), `tessera`
#   make clean    remove the venv and caches

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

SYS_PY  := /usr/bin/python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.tessera-setup-done
QGIS_OK := $(VENV)/.qgis-apt-done
# qemu-user: the int8 check on an emulated CPU without VNNI (tests/core/test_quantize.py)
APT_PKGS := python3-qgis qgis-providers qgis python3-venv xvfb qemu-user
# Headless Qt for every QGIS process started from here.
export QT_QPA_PLATFORM := offscreen
# Never let a library reach for the internet at run time.
export HF_HUB_OFFLINE := 1

.PHONY: help setup test test-core test-plugin test-qgis-matrix bench bench-cluster bench-gpu demo lint clean package deploy train-default

help:
	@sed -n '2,18p' Makefile | sed 's/^# \{0,1\}//'

setup: $(STAMP)

# QGIS 3.22 LTR from Debian (with PyQGIS for /usr/bin/python3 and qgis_process).
$(QGIS_OK):
	@if $(SYS_PY) -c 'import qgis.core' 2>/dev/null && [ -x /usr/bin/qgis_process.bin ] \
	    && $(SYS_PY) -c 'import venv, ensurepip' 2>/dev/null && command -v Xvfb >/dev/null \
	    && command -v qemu-x86_64 >/dev/null; then \
	  echo "QGIS from apt: already installed"; \
	else \
	  echo "Installing QGIS and friends from apt: $(APT_PKGS)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(APT_PKGS); \
	fi
	@mkdir -p $(VENV) && touch $@

# PostgreSQL with PostGIS from Debian: the tests start a server of their own (polygons into
# PostGIS, issue 19); the cluster the Debian package makes for itself is not used.
PG_OK := $(VENV)/.postgis-apt-done
PG_PKGS := postgresql postgresql-15-postgis-3
$(PG_OK): $(QGIS_OK)
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    && ls /usr/share/postgresql/*/extension/postgis.control >/dev/null 2>&1; then \
	  echo "PostgreSQL and PostGIS from apt: already installed"; \
	else \
	  echo "Installing PostgreSQL and PostGIS from apt: $(PG_PKGS)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(PG_PKGS) \
	    || { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(PG_PKGS); }; \
	fi
	@touch $@

# The venv sees PyQGIS (system site-packages) and holds Tessera's pinned packages.
$(STAMP): $(QGIS_OK) $(PG_OK) requirements.txt requirements-dev.txt
	@if [ ! -x $(PY) ]; then echo "Creating $(VENV) (with system site-packages, for PyQGIS)"; \
	  $(SYS_PY) -m venv --system-site-packages $(VENV); fi
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-dev.txt
	@# Make `import tessera` resolve to this checkout, and install the `tessera` command.
	$(PY) tools/link_checkout.py "$(CURDIR)"
	$(PY) -m tessera.core.jobs.envcheck
	@touch $@

# the lint (ruff, mypy, the house rules) first: a house that breaks its rules fails fast. The
# chroots of the other QGIS versions (and the 3.44 one's engine venv) are built meanwhile, in
# the background (mostly downloads and unpacking, while the tiers here use the CPUs); the
# matrix run then waits for that build (a lock) and redoes whatever it could not do, saying why.
MATRIX := 3.40 3.44
test: lint
	@if [ "$$(id -u)" = 0 ]; then echo "Building the QGIS $(MATRIX) chroots in the background" \
	  "(log: $(VENV)/matrix-prepare.log)"; \
	  (tools/qgis_matrix.sh --prepare $(MATRIX) > $(VENV)/matrix-prepare.log 2>&1 &); fi
	@df -h --output=avail,target /tmp . | tail -n +2 | sed 's/^ */disk free: /'
	$(PY) -m pytest -p no:pytest_qgis tests/core
	$(PY) -m pytest tests/plugin
	tools/qgis_matrix.sh $(MATRIX)

test-qgis-matrix: setup
	tools/qgis_matrix.sh $(MATRIX)

test-core: setup
	$(PY) -m pytest -p no:pytest_qgis tests/core

test-plugin: setup
	$(PY) -m pytest tests/plugin

bench: setup
	$(PY) benchmarks/bench_cpu.py --write BENCHMARKS.md
	$(PY) benchmarks/bench_onnx.py --write BENCHMARKS.md
	$(PY) benchmarks/bench_int8.py --write BENCHMARKS.md
	$(PY) benchmarks/bench_int8.py --isa avx2 --write BENCHMARKS.md
	$(PY) benchmarks/bench_web.py --write BENCHMARKS.md

# The Dask path against the plain local run at equal cores (issue 19): prints a table
bench-cluster: setup
	$(PY) benchmarks/bench_cluster.py

# On the GPU machine, which has PyTorch but not this venv: its own python3, the wheels carried
# in .whl/ (tools/gpu_wheels.sh), this checkout importable as `tessera`. Here (no GPU):
# BENCH_GPU_ARGS=--quick rehearses it on the CPU in the venv.
BENCH_GPU_ARGS ?=
bench-gpu:
	@set -e; if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile \
	  --no-cache-dir --upgrade --target /tmp/tessera-site .whl/*.whl; fi; \
	mkdir -p /tmp/tessera-pkg; ln -sfn "$(CURDIR)" /tmp/tessera-pkg/tessera; \
	py=python3; [ -x $(PY) ] && $(PY) -c 'import torch.cuda as c; assert c.is_available()' \
	  2>/dev/null && py=$(PY); case "$(BENCH_GPU_ARGS)" in *--quick*) py=$(PY);; esac; \
	PYTHONPATH=/tmp/tessera-site:/tmp/tessera-pkg PYTHONUNBUFFERED=1 $$py benchmarks/bench_gpu.py \
	  --out "$${OUT:-bench-gpu-out}" $(BENCH_GPU_ARGS)

# The shipped default model's recipe (its model card): 100 epochs of 1300 patches, batch 16,
# peak learning rate 0.002. On one H200 about 6 minutes (two runs sharing it); on a 2-core
# CPU many hours, so a CPU preview may pass e.g. TRAIN_ARGS="... --max-minutes 110" (the
# schedule is then fitted to the budget).
DUBAI ?= ../shared/data/dubai-aerial
DEFAULT_MODEL := resources/models/dubai_unet_resnet34.safetensors
TRAIN_ARGS ?= --epochs 100 --patches-per-epoch 1300 --batch-size 16 --lr 0.002
train-default: setup
	@[ -d "$(DUBAI)" ] || { echo "No Dubai dataset at $(DUBAI) (set DUBAI=folder)"; exit 1; }
	$(VENV)/bin/tessera train "$(DUBAI)" --out $(DEFAULT_MODEL) --name "Dubai land cover" \
	  --inference-tile 512 --checkpoint $(VENV)/train-default-ckpt $(TRAIN_ARGS)

demo: setup
	$(PY) resources/demo.py

QGIS_PROFILE ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default

package: setup
	$(SYS_PY) tools/package.py --out dist --engine $(PY)

deploy: setup package
	@mkdir -p "$(QGIS_PROFILE)/python/plugins" "$(QGIS_PROFILE)/tessera"
	rm -rf "$(QGIS_PROFILE)/python/plugins/tessera"
	cd "$(QGIS_PROFILE)/python/plugins" && $(SYS_PY) -m zipfile -e "$(CURDIR)/$$(ls -t dist/tessera-*.zip | head -1)" .
	@# the engine environment: this checkout's venv (Check / install dependencies can make its own)
	@[ -e "$(QGIS_PROFILE)/tessera/venv" ] || ln -s "$(CURDIR)/$(VENV)" "$(QGIS_PROFILE)/tessera/venv"
	QGIS_CUSTOM_CONFIG_PATH="$$(dirname $$(dirname "$(QGIS_PROFILE)"))" /usr/bin/qgis_process.bin plugins enable tessera || true
	@echo "Installed into $(QGIS_PROFILE)/python/plugins/tessera"

# flake8-qgis runs its import rules (QGS1xx) and Qt6 migration rules (QGS4xx); its QGS2xx rules
# are experimental (every unchecked bool of addParameter...) and left out.
lint: setup
	$(VENV)/bin/ruff check core bridge ui tessera_provider plugin.py __init__.py tests benchmarks tools resources
	cd $(VENV)/src && ../bin/mypy --config-file "$(CURDIR)/pyproject.toml" -p tessera.core
	$(PY) tools/check_house.py
	QT_QPA_PLATFORM=offscreen $(PY) tools/check_qt6.py
	$(VENV)/bin/flake8 --select=QGS1,QGS4 __init__.py plugin.py ui bridge tessera_provider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
