# ossrun: `make demo` runs the server on the embedded tiny model; `make test` runs the tests.
# Both set up .venv from nothing, with torch's CPU build: an unpinned torch, or plain PyPI's Linux
# torch, is a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
TORCH := torch==2.13.0
# Where the CPU build comes from: a wheel pip already finds on disk (its find-links, as on these machines), else
# PyTorch's CPU index. Asked only when .venv is set up; `make TORCH_INDEX= test` takes whatever PyPI gives.
TORCH_INDEX ?= $(shell $(PYTHON) -m pip install --dry-run --no-index --no-deps --quiet $(TORCH) >/dev/null 2>&1 \
                 || echo --index-url https://download.pytorch.org/whl/cpu)

# constraints.txt holds the versions the suite last passed with, so that a release upstream cannot fail a clean
# clone's CI overnight (transformers 5.25 did: it began fetching a hub kernel). `make lock` rewrites it from .venv;
# pyproject.toml keeps the ranges a user's `pip install` resolves.
.PHONY: setup demo test bench clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_INDEX) $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]' $(TORCH) -c constraints.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(BIN)/python -m ossrun.demo

# Two workers, a file each at a time (a file's server fixture starts once): the suite takes ~2/3 of the time.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python bench/throughput.py

lock: setup
	$(BIN)/pip freeze --exclude-editable --disable-pip-version-check | grep -viE '^(torch|ossrun)==' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
