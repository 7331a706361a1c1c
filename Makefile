# The README's two commands. python3 and make are all a new machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/shapes.yaml
# pytest-xdist workers of `make test` (one per core of the 2-core CI machine; 0: one process)
TEST_WORKERS ?= 2
PYTEST = WANDB_MODE=offline $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

.PHONY: fit test test-oldest bench help

help:
	@echo "make fit    build .venv if missing, install lightning-rpn, train on $(CONFIG)"
	@echo "make test   build or refresh .venv with the test extra, run the whole test suite"
	@echo "make test-oldest  the suite again, with the oldest admitted lightning, jsonargparse,"
	@echo "                  torchmetrics and albumentations (tests/oldest-versions.txt)"
	@echo "make bench  run every benchmark under bench/ (ours and torchvision side by side)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

fit: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	$(BIN)/lightning-rpn fit --config $(CONFIG)

test: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PYTEST)

# the oldest admitted releases, installed into .oldest/ and put first on the path (their own
# dependencies are the test environment's)
test-oldest: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -rf .oldest
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target .oldest -r tests/oldest-versions.txt
	PYTHONPATH=.oldest NO_ALBUMENTATIONS_UPDATE=1 $(PYTEST)

bench: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@for script in bench/bench_*.py; do \
		echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done
