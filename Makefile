# The README's two commands. Both build .venv/ (only when missing or incomplete) first.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUTPUT ?= output/demo

.PHONY: setup test test-quick demo clean-venv

setup:
	bash tools/setup_env.sh

# pytest exits 5 when it collects no test; make would turn that into a generic 2, so the
# recipe says it out loud and fails: a suite that runs nothing is not a pass.
test: setup
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# The developer's inner loop: everything but the tests marked `slow` (training runs, subprocess
# launches, kill trials). `make test` stays the whole suite.
test-quick: setup
	@$(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-quick: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

demo: setup
	$(PY) tools/run_demo.py --output $(DEMO_OUTPUT)

clean-venv:
	rm -rf $(VENV)
