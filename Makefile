# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and
# `make test`. Each creates the virtualenv and installs what it needs, system packages included.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
FMNIST  = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install data clean

demo: install data
	$(BIN)/latprune run --budget 0.5

test: install data
	$(BIN)/python -m pytest -q

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
