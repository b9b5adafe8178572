# `make serve` and `make test` bootstrap their own environment in .venv.
# torch is pinned and installed first: a plain `torch` requirement would pull
# several GB of CUDA wheels, while torch==2.13.0 has a local CPU build here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.treespec-installed
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
BUNDLE ?= models/default

.PHONY: venv test serve clean

$(STAMP): pyproject.toml
	@echo "treespec: first run, setting up $(VENV) (about 2 minutes, once)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "treespec: [1/2] installing $(TORCH), the CPU build (about 200 MB)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	@echo "treespec: [2/2] installing treespec and its dependencies (fastapi, lightgbm, tiktoken, ...; about a minute)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)
	@echo "treespec: $(VENV) is ready"

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/treespec serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
