"""The CPU flavour (docker/compose.cpu.yml) is the GPU deployment with build arguments swapped
and the GPU reservation dropped, nothing else; checked without an engine, in `make test`.

The containers themselves run in tests/deploy/test_containers.py (`make deploy-test`).
"""

from __future__ import annotations

import copy
import re

import pytest
import tomllib
from ruamel.yaml import YAML

from tests.deploy.dockerfile import (
    arg_defaults,
    expand,
    image_installs,
    instructions,
    requirement_name,
)
from tests.deploy.test_compose import COMPOSE, DOCKER, extra_requirements, load_compose, spec_errors
from tests.support.paths import ROOT

CPU = DOCKER / "compose.cpu.yml"
RESET = object()


def load_cpu() -> dict:
    yaml = YAML(typ="safe", pure=True)
    yaml.constructor.add_constructor("!reset", lambda constructor, node: RESET)
    return yaml.load(CPU.read_text(encoding="utf-8"))


def merged(base: dict, override: dict) -> dict:
    """The Compose merge of one override: mappings merge key by key, !reset removes, the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is RESET:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default(value: str) -> str:
    """``${NAME:-default}`` -> default; plain values as they are."""
    match = re.fullmatch(r"\$\{[A-Za-z_]\w*:-([^}]*)\}", value)
    return match.group(1) if match else value


@pytest.fixture(scope="module")
def cpu() -> dict:
    return load_cpu()


def test_the_cpu_flavour_follows_the_compose_specification(cpu):
    doc = merged(load_compose(), {k: v for k, v in cpu.items() if not k.startswith("x-")})
    assert spec_errors(doc) == []
    for name in ("worker", "trainer"):
        assert "deploy" not in doc["services"][name], "no GPU reservation on a CPU host"
        assert "deploy" in load_compose()["services"][name], "the GPU flavour keeps it"


def test_it_swaps_build_arguments_and_drops_the_reservation_only(cpu):
    allowed = {
        "redis": {"image"},
        "api": {"build"},
        "worker": {"build", "deploy"},
        "trainer": {"build", "deploy"},
    }
    assert set(cpu["services"]) == set(allowed)
    for name, service in cpu["services"].items():
        assert set(service) <= allowed[name], name
        if "deploy" in service:
            assert service["deploy"] is RESET
    base = load_compose()["services"]
    assert default(cpu["services"]["redis"]["image"]) == base["redis"]["image"]
    for name in ("api", "worker", "trainer"):
        build = cpu["services"][name]["build"]
        assert {k: v for k, v in build.items() if k != "args"} == base[name]["build"], name


@pytest.mark.parametrize(
    "service, dockerfile",
    [("api", "api.Dockerfile"), ("worker", "worker.Dockerfile"), ("trainer", "worker.Dockerfile")],
)
def test_every_build_argument_is_one_the_dockerfile_declares(cpu, service, dockerfile):
    stages = instructions(DOCKER / dockerfile)
    declared = {args.partition("=")[0] for stage in stages for op, args in stage if op == "ARG"}
    assert set(cpu["services"][service]["build"]["args"]) <= declared


def test_the_cpu_worker_image_installs_cpu_torch_onnxruntime_and_the_worker_extra(cpu):
    args = {k: default(v) for k, v in cpu["services"]["worker"]["build"]["args"].items()}
    stages = instructions(DOCKER / "worker.Dockerfile")
    final = expand(
        next(a for op, a in stages[-1] if op == "FROM"), {**arg_defaults(stages, 0), **args}
    )
    assert "cuda" not in final and final.startswith("debian:")
    # the Dockerfile's installs with the CPU arguments in place of its defaults
    stages[-1] = [
        (op, f"{a.partition('=')[0]}={args[a.partition('=')[0]]}")
        if op == "ARG" and a.partition("=")[0] in args
        else (op, a)
        for op, a in stages[-1]
    ]
    installs = image_installs(stages, -1)
    [torch] = [
        cmd for cmd in installs if any(requirement_name(r) == "torch" for r in cmd.requirements)
    ]
    assert torch.option("--index-url") == "https://download.pytorch.org/whl/cpu"
    names = {requirement_name(r) for cmd in installs for r in cmd.requirements}
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names
    assert any(r.endswith("[worker]") for cmd in installs for r in cmd.requirements)
    assert "onnxruntime-gpu" not in {requirement_name(r) for r in extra_requirements("worker")}


def test_make_test_leaves_the_container_tests_to_make_deploy_test():
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "addopts"
    ]
    assert "-m 'not deploy'" in addopts
    assert (
        "pytestmark = pytest.mark.deploy"
        in (ROOT / "tests" / "deploy" / "test_containers.py").read_text()
    )
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^deploy-test:.*\n\t.*pytest .*-m deploy tests/deploy", makefile, re.M)
    assert COMPOSE.name in (ROOT / "service" / "devstack" / "deploy.py").read_text()
