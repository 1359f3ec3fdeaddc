# aimesh — the two commands a fresh machine needs are `make demo` and `make test`; both run `make setup` first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.aimesh-installed

.PHONY: setup demo test unit soak bench proto clean k8s-check
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

# Two workers, one test file per worker at a time (tests in a file share module fixtures); the kernel tests share one
# compilation of the BPF programs per session (tests/conftest.py). Soak runs are left to `make soak`.
test: setup
	$(PY) -m pytest -ra -n 2 --dist loadfile -m "not soak" tests

# No root needed: the kernel tests are the ones marked `kernel` (everything under tests/kernel).
unit: setup
	$(PY) -m pytest -ra -m "not kernel and not soak" tests/unit

soak: setup
	AIMESH_FUZZ=1 $(PY) -m pytest -ra -m "soak or fuzz" tests

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.restart
	$(PY) -m bench.flood
	$(PY) -m bench.calls
	$(PY) -m bench.gateway

clean:
	rm -rf $(VENV) agent/_gen build *.egg-info
