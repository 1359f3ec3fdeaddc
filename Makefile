# aimesh — the two commands a fresh machine needs are `make demo` and `make test`; both run `make setup` first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.aimesh-installed

.PHONY: setup demo test unit bench proto clean k8s-check
setup:
	@bash deploy/host/setup.sh
	@# deploy/k8s is rendered by kustomize v5+ (tests/unit/test_k8s_manifests.py): a kustomize binary or kubectl's
	@# embedded one. Neither comes from Debian (its kubernetes-client 1.20 embeds kustomize v2) nor PyPI: say so.
	@command -v kustomize >/dev/null 2>&1 || command -v kubectl >/dev/null 2>&1 \
	  || echo "[setup] warning: neither kustomize nor kubectl on PATH: tests/unit/test_k8s_manifests.py will fail"

k8s-check: setup
	$(PY) -m pytest -ra tests/unit/test_k8s_manifests.py

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
	$(PY) -m bench.gateway

clean:
	rm -rf $(VENV) agent/_gen build *.egg-info
