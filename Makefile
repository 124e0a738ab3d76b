# Two commands: `make up` runs the local service, `make test` runs the whole suite (`make test-fast`
# its in-process part: no test marked `process` or `slow`, under 2 minutes on 2 cores).
# Both create .venv when it is missing. torch is installed first from TORCH_SPEC (a CPU wheel
# by default); pass TORCH_SPEC="torch==2.13.0 --index-url ..." for another build.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= api,worker,devstack,test,docs
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.smoothcert-installed
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: up test test-fast lint bench demo clean

up: $(STAMP)
	$(VENV)/bin/smoothcert up

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q --durations=15

# The tests that start no process and no server (no Redis, Celery worker, uvicorn, browser,
# `smoothcert` subprocess or container; tests/conftest.py marks the others `process`) and are not
# `slow`: under 2 minutes on 2 cores, and no chromium needed.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not process and not slow and not deploy" --durations=10

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

# Debian's chromium, which tests/browser drive through Playwright (which then downloads no
# browser of its own); nothing to do, and nothing printed, when it is already installed.
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

clean:
	rm -rf $(VENV) var build *.egg-info

.PHONY: openapi
openapi: $(STAMP)
	$(PY) -m smoothcert.service.devstack.openapi_doc

# The manual (mkdocs.yml, docs/): `make docs` builds it into site/ (git ignores it; the API serves
# it at /manual/) with --strict, so a broken link or anchor fails the build; `make docs-serve`
# serves it at http://127.0.0.1:8001/manual/ with live reload; `make docs-gen` rewrites the generated reference
# pages (settings, CLI, HTTP API from openapi/openapi.json, TSV columns), which a test compares.
.PHONY: docs docs-serve docs-gen
DOCS_ENV := NO_MKDOCS_2_WARNING=1

docs: $(STAMP)
	$(DOCS_ENV) $(VENV)/bin/mkdocs build --strict --clean --site-dir site

docs-serve: $(STAMP)
	$(DOCS_ENV) $(VENV)/bin/mkdocs serve --strict --dev-addr 127.0.0.1:8001

docs-gen: $(STAMP)
	$(PY) -m smoothcert.service.cli.reference_pages

# The compose deployment (docker/, CPU flavour: two certify workers and the trainer) in containers:
# docker where a Docker engine answers, podman otherwise (installed here when missing, as root).
# SMOOTHCERT_PORT and the keys come from the environment or docker/.env (created when missing).
# `make deploy-test` starts its own deployment, injects faults into it and removes it again.
.PHONY: deploy-tools deploy-up deploy-down deploy-test
DEPLOY_STAMP := $(VENV)/.smoothcert-deploy-installed
DEPLOY := $(PY) -m smoothcert.service.devstack.deploy

deploy-tools:
	@if docker info >/dev/null 2>&1; then echo "using the Docker engine"; \
	elif command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; then :; \
	else $$( [ "$$(id -u)" = 0 ] || echo sudo ) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null'; fi

$(DEPLOY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),deploy]'
	touch $(DEPLOY_STAMP)

deploy-up: deploy-tools $(DEPLOY_STAMP)
	$(DEPLOY) up

deploy-down: deploy-tools $(DEPLOY_STAMP)
	$(DEPLOY) down

deploy-test: deploy-tools $(DEPLOY_STAMP)
	$(PY) -m pytest -q -m deploy tests/deploy
