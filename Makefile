# Two commands: `make up` runs the local service, `make test` runs the whole suite.
# Both create .venv when it is missing. torch is installed first from TORCH_SPEC (a CPU wheel
# by default); pass TORCH_SPEC="torch==2.13.0 --index-url ..." for another build.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= api,worker,devstack,test
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.smoothcert-installed

.PHONY: up test lint bench demo clean

up: $(STAMP)
	$(VENV)/bin/smoothcert up

test: $(STAMP)
	$(PY) -m pytest -q

# The layer contracts (import-linter), the types (mypy), the style (ruff); also part of `make test`.
lint: $(STAMP)
	$(PY) -m tests.support.checks

# What users get (raw forward, CLI, a dataset job through the service) per model; see bench/users.py.
bench: $(STAMP)
	$(PY) -m bench.users

demo: $(STAMP)
	$(PY) -m smoothcert.models.demo var/demo
	$(VENV)/bin/smoothcert certify var/demo/digits_cnn.onnx --inputs var/demo/digits_test_x.npy \
		--labels var/demo/digits_test_y.npy --sigma 0.25 --n 10000 --seed 0 --out var/demo/certify.tsv
	$(VENV)/bin/smoothcert analyze var/demo/certify.tsv --radii 0,0.25,0.5,0.75

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	$(PY) -m tests.support.checks --install-view
	touch $(STAMP)

clean:
	rm -rf $(VENV) var build *.egg-info

.PHONY: openapi
openapi: $(STAMP)
	$(PY) -m smoothcert.service.devstack.openapi_doc
