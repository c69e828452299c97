# The two set-up commands of the README: `make demo` and `make test`.
# Each creates the virtual environment on first use (pinned by constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow system-deps bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/corelab demo

# System packages the tests use: dcmtk (storescu), dicom3tools (dciodvfy), postgresql.
system-deps:
	bash .ci/system-deps

test: $(STAMP) system-deps
	$(BIN)/pytest

# The slow suites (a phantom sweep at every 10 degrees of roll): CI runs them, an edit need not.
test-slow: $(STAMP) system-deps
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
