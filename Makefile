# Two commands do everything on a fresh clone:
#   make demo   # set up .venv, then run `prefalign demo` (the embedded default: DPO on the reviews world)
#   make test   # set up .venv, then run the test suite in its quick form (what CI runs)
# make test-full runs the slow end-to-end checks in their full form (much longer; see README).
.PHONY: setup demo test test-full lint
setup:
	bash scripts/bootstrap.sh
demo: setup
	.venv/bin/prefalign demo $(ARGS)
test: setup
	PREFALIGN_QUICK=1 .venv/bin/python -m pytest -q $(ARGS)
test-full: setup
	PREFALIGN_QUICK= .venv/bin/python -m pytest -q $(ARGS)
lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
