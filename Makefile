# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and
# `make test`. Each creates the virtualenv and installs what it needs, system packages included.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
FMNIST  = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint install data clean

# Exit 4 (the run finished and wrote its report, but the final timing missed the budget) is shown,
# not hidden; on shared 2-core machines timing drift can cause it (BENCHMARKS.md, issue 4).
# Budget 0.7, not 0.5: the smallest reachable ResNet-20 (every group at 8 channels) was 0.41 of
# dense in November (dense 12.98 ms) but a median 0.56 on 2026-12-02 (dense 8.6 ms, same CPU
# flags), where 0.5 was refused before training (exit 2, "below the smallest reachable latency");
# 0.7 is reachable on both (BENCHMARKS.md, "Layered layout").
DEMO_BUDGET ?= 0.7
# The demo starts from the bundled trained ResNet-20 (README, "Bundled weights") and shortens what
# `latprune run` does by default so that a fresh clone finishes in about 12 minutes on 2 cores:
# a quarter epoch of warm-up, half an epoch of fine-tuning, 200 corrupted test images, and a plan
# search over 8 candidates with 20-iteration fine-tunes (the default, 24 and 30, takes ~4 minutes).
DEMO_FLAGS  ?= --warmup-epochs 0.25 --finetune-epochs 0.5 --robust-images 200 --search 8 --search-iters 20
demo: install data
	$(BIN)/latprune run --budget $(DEMO_BUDGET) $(DEMO_FLAGS) || { rc=$$?; [ $$rc -eq 4 ] && echo "latprune: the demo finished but MISSED its latency budget (exit 4): see report.md" >&2 || exit $$rc; }

test: install data lint
	$(BIN)/python -m pytest -q

# ruff is pinned in the test extra (pyproject.toml: pyflakes, import order, line length 120)
lint: install
	$(BIN)/ruff check .

install: $(VENV)/.installed

# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's disk.
$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,test]'
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs .pytest_cache
