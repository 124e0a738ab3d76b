"""The docker deployment, checked without a docker engine.

docker/docker-compose.yml is validated against the Compose Specification's JSON schema (the copy
that check-jsonschema ships), then against the project itself: every service command goes
through the real entry points (the `smoothcert` CLI down to Celery's worker option parser, the
uvicorn factory path), queue names are ones the Celery app declares, docker/.env.example
documents exactly the Settings fields and is refused in production until its keys change, and
the Dockerfiles copy files that exist and keep the engine (torch, onnxruntime) out of the API image.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources

import jsonschema
import pytest
import tomllib
from pydantic import ValidationError
from ruamel.yaml import YAML

from smoothcert.service.core.queue import QUEUES
from smoothcert.service.core.settings import Settings
from tests.deploy.dockerfile import (
    env_file,
    image_installs,
    instructions,
    requirement_name,
    resolve_from,
)
from tests.support.paths import ROOT

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
APP_SERVICES = ("api", "worker", "trainer")
GPU_SERVICES = ("worker", "trainer")
# What runs a model: the workers' packages, never in the API image.
ENGINE_ONLY = {"torch", "safetensors", "onnx", "scipy", "scikit-learn", "matplotlib"}
NEVER_IN_API = ENGINE_ONLY | {"onnxruntime", "onnxruntime-gpu"}


def compose_spec_schema() -> dict:
    path = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text(encoding="utf-8"))


def load_compose() -> dict:
    return YAML(typ="safe").load(COMPOSE.read_text(encoding="utf-8"))


def spec_errors(doc: dict) -> list[str]:
    schema = compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, and ${VAR:?error} and ${VAR?error}
    (compose refuses to start with the error when VAR is unset, or with ":?" empty), with values
    from .env."""

    def one(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and (env[name] or not op.startswith(":")):
            return env[name]
        if op.endswith("?"):
            raise ValueError(f"compose refuses to start: {name}: {default}")
        return default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one, value).replace(
        "$$", "$"
    )


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return env_file(DOCKER / ".env.example")


# --- the Compose Specification ---------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose):
    assert spec_errors(compose) == []


def test_the_specification_check_catches_mistakes(compose):
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["worker"]["comand"] = misspelt["services"]["worker"].pop("command")
    assert any("comand" in e for e in spec_errors(misspelt))
    no_capabilities = copy.deepcopy(compose)
    del no_capabilities["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ]
    assert any("capabilities" in e for e in spec_errors(no_capabilities))


# --- services, volumes, settings ---------------------------------------------------------------


def test_services_and_named_volumes(compose):
    services = compose["services"]
    # the profile `ha` (tests/deploy/test_compose_ha.py): Redis with Sentinel
    ha = {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert set(services) == {"redis", *APP_SERVICES, *ha}
    declared = set(compose.get("volumes") or {})
    used = {m.split(":", 1)[0] for s in services.values() for m in s.get("volumes", [])}
    named = {v for v in used if not v.startswith((".", "/", "~", "$"))}
    assert named == used, "only named volumes: a bind mount depends on the host's layout"
    assert named == declared


def test_redis_keeps_an_append_only_file_on_a_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(m.endswith(":/data") for m in redis["volumes"])
    assert {"redis-cli", "ping"} <= set(redis["healthcheck"]["test"])


def test_redis_has_a_memory_budget_and_evicts_nothing(compose, env):
    command = [interpolate(part, env) for part in compose["services"]["redis"]["command"]]
    budget = command[command.index("--maxmemory") + 1]
    assert (
        budget
        == env["SMOOTHCERT_REDIS_MAXMEMORY"]
        == str(Settings.model_fields["redis_maxmemory"].default)
    )
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    # Unset in .env, the default still bounds it.
    unset = {k: v for k, v in env.items() if k != "SMOOTHCERT_REDIS_MAXMEMORY"}
    command = [interpolate(part, unset) for part in compose["services"]["redis"]["command"]]
    assert command[command.index("--maxmemory") + 1] == budget


def test_one_data_volume_is_mounted_at_the_data_dir(compose, env):
    mounts = {
        name: [interpolate(m, env) for m in compose["services"][name]["volumes"]]
        for name in APP_SERVICES
    }
    targets = {name: {m.split(":")[1]: m.split(":")[0] for m in ms} for name, ms in mounts.items()}
    data_dir = env["SMOOTHCERT_DATA_DIR"]
    assert {t.get(data_dir) for t in targets.values()} == {"data"}
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        final = instructions(DOCKER / dockerfile)[-1]
        assert any(f"mkdir -p {data_dir}" in args for op, args in final if op == "RUN"), dockerfile


def test_app_services_read_the_env_file(compose, env):
    for name in APP_SERVICES:
        assert compose["services"][name]["env_file"] in (".env", [".env"]), name
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    assert used <= set(env), f"interpolated but not in .env.example: {sorted(used - set(env))}"
    assert env["SMOOTHCERT_REDIS_URL"].startswith("redis://redis:")


def test_env_example_documents_every_setting_and_nothing_else(env):
    documented = {k for k in env if k.startswith("SMOOTHCERT_")}
    fields = {f"SMOOTHCERT_{name.upper()}" for name in Settings.model_fields}
    assert sorted(documented - fields) == [], "not a Settings field"
    assert sorted(fields - documented) == [], (
        "a Settings field docker/.env.example does not document"
    )


def test_env_example_is_refused_in_production_until_the_keys_change(env):
    values = {
        k.removeprefix("SMOOTHCERT_").lower(): v
        for k, v in env.items()
        if k.startswith("SMOOTHCERT_")
    }
    assert values["env"] == "production"
    with pytest.raises(ValidationError, match="SMOOTHCERT_API_KEY"):
        Settings(**values)
    with pytest.raises(ValidationError, match="SMOOTHCERT_REDIS_PASSWORD"):
        Settings(**{**values, "api_key": "k" * 32, "admin_key": "a" * 32})
    keys = {"api_key": "k" * 32, "admin_key": "a" * 32, "redis_password": "r" * 32}
    with pytest.raises(ValidationError, match="SMOOTHCERT_KEY_PEPPER"):
        Settings(**{**values, **keys})
    settings = Settings(**{**values, **keys, "key_pepper": "p" * 32})
    assert settings.env == "production" and str(settings.data_dir) == env["SMOOTHCERT_DATA_DIR"]
    assert settings.broker_url == f"redis://:{'r' * 32}@redis:6379/0"


def test_redis_needs_the_password_and_is_published_nowhere(compose, env):
    redis = compose["services"]["redis"]
    command = [interpolate(part, env) for part in redis["command"]]
    assert command[command.index("--requirepass") + 1] == env["SMOOTHCERT_REDIS_PASSWORD"]
    with pytest.raises(
        ValueError, match="set SMOOTHCERT_REDIS_PASSWORD"
    ):  # compose refuses to start without one
        [interpolate(part, {**env, "SMOOTHCERT_REDIS_PASSWORD": ""}) for part in redis["command"]]
    assert (
        interpolate(redis["environment"]["REDISCLI_AUTH"], env) == env["SMOOTHCERT_REDIS_PASSWORD"]
    )
    assert "ports" not in redis and "network_mode" not in redis, (
        "only the project's own network reaches Redis"
    )
    for name in APP_SERVICES:  # the password reaches the app containers through .env, nothing else
        assert "SMOOTHCERT_REDIS_PASSWORD" not in str(
            compose["services"][name].get("environment", "")
        )


# --- the API service and image -----------------------------------------------------------------


def api_command() -> list[str]:
    final = instructions(DOCKER / "api.Dockerfile")[-1]
    return json.loads([args for op, args in final if op == "CMD"][-1])


def test_api_service_publishes_the_port_and_waits_for_redis(compose, env):
    api = compose["services"]["api"]
    assert (DOCKER / api["build"]["context"]).resolve() == ROOT
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    command = api_command()
    port = command[command.index("--port") + 1]
    [mapping] = [interpolate(p, env) for p in api["ports"]]
    assert mapping == f"{env['SMOOTHCERT_HOST']}:{env['SMOOTHCERT_PORT']}:{port}"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])


def test_the_api_may_open_more_files_than_its_connection_bound(compose, env):
    # The engine's default limit holds (a service's own ulimits keep it from starting here).
    assert "ulimits" not in compose["services"]["api"]
    conf = (DOCKER / "podman" / "containers.conf").read_text()
    [limits] = re.findall(r"^default_ulimits = \[(.*)\]$", conf, re.MULTILINE)
    [nofile] = re.findall(r'"nofile=(\d+):(\d+)"', limits)
    assert 2 * int(env["SMOOTHCERT_HTTP_MAX_CONCURRENCY"]) <= int(nofile[0]) <= int(nofile[1])


def test_api_command_serves_the_app_factory(tmp_path):
    """The image starts the API as `smoothcert up` does (the server with deadlines for slow
    clients, whose figures come from the settings), on 0.0.0.0."""
    from smoothcert.service.api import server
    from smoothcert.service.devstack.commands import api_command as up_api_command

    command = api_command()
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command == ["python", *up_api_command("0.0.0.0", 8000)[1:]]
    module, _, attr = server.APP_FACTORY.partition(":")
    assert (module, attr) == ("smoothcert.service.app", "create_app")
    config = server.server_config(
        Settings(data_dir=tmp_path, http_keep_alive_s=7, http_max_concurrency=99), "0.0.0.0", 8000
    )
    assert (config.timeout_keep_alive, config.limit_concurrency) == (7, 99)
    assert issubclass(config.http, server.GuardedH11Protocol) and config.ws == "none"
    from smoothcert.service.app import create_app

    app = create_app(Settings(data_dir=tmp_path), configure_logs=False)
    assert "/healthz" in app.openapi()["paths"]
    final = instructions(DOCKER / "api.Dockerfile")[-1]
    [healthcheck] = [args for op, args in final if op == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{command[command.index('--port') + 1]}/healthz" in healthcheck


def extra_requirements(*extras: str) -> set[str]:
    """The base dependencies and those of ``extras``, with the project's own extras expanded."""
    project = pyproject()["project"]
    found, todo = set(project["dependencies"]), list(extras)
    while todo:
        for requirement in project["optional-dependencies"][todo.pop()]:
            if requirement_name(requirement) == "smoothcert":
                todo += re.search(r"\[(.*)\]", requirement).group(1).split(",")
            else:
                found.add(requirement)
    return found


def test_the_api_extra_holds_no_engine_package():
    names = {requirement_name(r) for r in extra_requirements("api")}
    assert not names & NEVER_IN_API
    assert {"fastapi", "uvicorn", "h11", "celery", "redis"} <= names  # the API's server's imports
    # the check above can fail: the worker extras do bring the engine in
    assert ENGINE_ONLY <= {requirement_name(r) for r in extra_requirements("worker")}
    assert "onnxruntime-gpu" in {requirement_name(r) for r in extra_requirements("gpu")}


def test_api_image_is_a_plain_install_of_the_api_extra():
    stages = instructions(DOCKER / "api.Dockerfile")
    assert "slim" in resolve_from(stages, -1) and "cuda" not in resolve_from(stages, -1)
    installs = image_installs(stages, -1)
    assert [cmd.requirements for cmd in installs] == [[".[api]"]], (
        "the API image installs the `api` extra and lists nothing by hand"
    )
    assert "--no-deps" not in installs[0].options


def declared_queues() -> set[str]:
    from smoothcert.worker.queue import celery_app

    conf = celery_app.app.conf
    queues = {v for k, v in vars(celery_app).items() if k.endswith("QUEUE") and isinstance(v, str)}
    queues.add(conf.task_default_queue)
    routes = conf.task_routes or {}
    queues |= {
        r["queue"] for r in (routes.values() if isinstance(routes, dict) else []) if "queue" in r
    }
    queues |= {q.name for q in conf.task_queues or ()}
    return queues


def effective_worker_options(command: list[str], monkeypatch) -> dict:
    """What `celery worker` would run with after the `smoothcert` CLI has built its argv."""
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker as celery_worker

    from smoothcert.service.cli.main import main as smoothcert_main
    from smoothcert.worker.queue import celery_app

    scripts = pyproject()["project"]["scripts"]
    assert scripts.get(command[0]) == "smoothcert.service.cli.main:main", (
        f"{command[0]} is not our console script"
    )
    captured: list[list[str]] = []
    monkeypatch.setattr(celery_app.app, "worker_main", captured.append)
    try:
        smoothcert_main(command[1:])
    except SystemExit as exc:
        pytest.fail(f"the smoothcert CLI refuses `{' '.join(command)}` (exit {exc.code})")
    [argv] = captured
    argv = argv[1:] if argv[0] == "--quiet" else argv  # the one `celery` option main() may add
    assert argv[0] == "worker"
    obj = CLIContext(app=celery_app.app, no_color=True, workdir=None, quiet=True)
    return celery_worker.make_context("worker", argv[1:], obj=obj).params


@pytest.mark.parametrize("service, queue", [("worker", "certify"), ("trainer", "train")])
def test_worker_commands_run_a_declared_queue(compose, service, queue, monkeypatch):
    command = compose["services"][service]["command"]
    assert command[:2] == ["smoothcert", "worker"]
    options = effective_worker_options(command, monkeypatch)
    assert options["queues"] == [queue]
    assert set(options["queues"]) <= declared_queues()
    assert options["concurrency"] == 1, "one process per GPU"


def test_gpu_services_reserve_gpus_and_can_scale(compose):
    for name in GPU_SERVICES:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "docker/worker.Dockerfile"
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert (
            device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" in device
        )
        assert service["shm_size"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "container_name" not in service and "ports" not in service, "--scale needs neither"
        assert service.get("init") is True, "an init reaps the prefork pool's children"


def test_worker_image_is_cuda_torch_pinned_like_the_makefile():
    stages = instructions(DOCKER / "worker.Dockerfile")
    assert re.match(r"nvidia/cuda:[\d.]+-cudnn-runtime-", resolve_from(stages, -1))
    installs = image_installs(stages, -1)
    [torch] = [
        cmd for cmd in installs if any(requirement_name(r) == "torch" for r in cmd.requirements)
    ]
    makefile = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert torch.requirements == [f"torch=={makefile.group(1)}"]
    assert re.match(r"https://download\.pytorch\.org/whl/cu\d+$", torch.option("--index-url"))
    assert any(
        r.endswith(".whl)[gpu]") or r.endswith("[gpu]")
        for cmd in installs
        for r in cmd.requirements
    )
    final = stages[-1]
    assert [args for op, args in final if op == "USER"][-1] not in ("root", "0")
    entrypoint = json.loads([args for op, args in final if op == "ENTRYPOINT"][-1])
    assert any(
        op == "COPY" and args.split() == ["docker/gpu-claim.sh", f"/usr/local/bin/{entrypoint[0]}"]
        for op, args in final
    )
    command = json.loads([args for op, args in final if op == "CMD"][-1])
    assert command[command.index("--queues") + 1] in QUEUES, (
        "`docker run` of the image must consume a queue"
    )


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_copy_files_that_exist_and_run_as_a_user(dockerfile):
    stages = instructions(DOCKER / dockerfile)
    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for stage in stages:
        for op, args in stage:
            if op != "COPY" or args.startswith("--from"):
                continue
            *sources, _ = json.loads(args) if args.startswith("[") else args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such file"
                assert source.rstrip("/") in allowed, (
                    f"{dockerfile}: {source} is left out of the build context"
                )
    assert [args for op, args in stages[-1] if op == "USER"][-1] == "smoothcert"
