# aimesh — the two commands a fresh machine needs are `make demo` and `make test`; both run `make setup` first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.aimesh-installed

.PHONY: setup demo test unit bench proto clean
setup:
	@bash deploy/host/setup.sh

demo: setup
	$(VENV)/bin/aimesh demo --config deploy/examples/demo.yaml

test: setup
	$(PY) -m pytest -ra tests

unit: setup
	$(PY) -m pytest -ra tests/unit

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.restart
	$(PY) -m bench.flood
	$(PY) -m bench.calls

clean:
	rm -rf $(VENV) agent/_gen build *.egg-info
