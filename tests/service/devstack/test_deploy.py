"""`make deploy-up`'s settings and build plumbing, without an engine (the containers themselves
run in tests/deploy/test_containers.py under `make deploy-test`).

docker/.env is written from docker/.env.example once, with the environment's secrets or random
ones; the environment then wins over it, placeholder secrets are refused, and the generated
override hands the environment to the containers as a valid Compose file.
"""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from smoothcert.service.devstack.deploy import (
    CERTIFY_WORKERS,
    SECRETS,
    DeployError,
    effective_settings,
    ensure_env_file,
    local_override,
    podman_build_args,
    read_env_file,
)
from tests.deploy.test_compose import load_compose, spec_errors
from tests.deploy.test_cpu_flavour import merged
from tests.support.paths import ROOT


@pytest.fixture
def root(tmp_path):
    (tmp_path / "docker").mkdir()
    shutil.copy(ROOT / "docker" / ".env.example", tmp_path / "docker" / ".env.example")
    return tmp_path


def test_env_file_is_written_once_with_random_or_given_secrets(root):
    path, created = ensure_env_file(root, {"SMOOTHCERT_API_KEY": "k" * 40})
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    values, example = read_env_file(path), read_env_file(root / "docker" / ".env.example")
    assert values["SMOOTHCERT_API_KEY"] == "k" * 40
    others = [values[k] for k in SECRETS if k != "SMOOTHCERT_API_KEY"]
    assert len(set(others)) == len(SECRETS) - 1 and all(len(v) >= 32 for v in others)
    kept = lambda env: {k: v for k, v in env.items() if k not in SECRETS}  # noqa: E731
    assert kept(values) == kept(example)
    path.write_text(path.read_text() + "SMOOTHCERT_PORT=9999\n")
    assert ensure_env_file(root, {}) == (path, False)
    assert read_env_file(path)["SMOOTHCERT_PORT"] == "9999"


def test_the_environment_wins_over_the_env_file_and_placeholders_are_refused(root):
    path, _ = ensure_env_file(root, {})
    settings = effective_settings(
        path, {"SMOOTHCERT_PORT": "18000", "SMOOTHCERT_ADMIN_KEY": "a" * 32, "HOME": "/"}
    )
    assert settings["SMOOTHCERT_PORT"] == "18000" and settings["SMOOTHCERT_ADMIN_KEY"] == "a" * 32
    assert "HOME" not in settings
    with pytest.raises(DeployError, match="SMOOTHCERT_REDIS_PASSWORD still has the example value"):
        effective_settings(path, {"SMOOTHCERT_REDIS_PASSWORD": "change-me"})


def test_the_local_override_hands_the_environment_to_the_containers(tmp_path):
    path = local_override(
        tmp_path / "p" / "local.yml", {"SMOOTHCERT_API_KEY": "a$b", "PATH": "/bin"}
    )
    override = json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for name in ("api", "worker", "trainer"):
        assert override["services"][name]["environment"] == {"SMOOTHCERT_API_KEY": "a$$b"}
    assert override["services"]["worker"]["scale"] == CERTIFY_WORKERS
    assert spec_errors(merged(load_compose(), override)) == []


@pytest.mark.process
def test_builds_get_a_pip_conf_for_what_they_mount(tmp_path):
    args = podman_build_args(tmp_path).split()
    mounts = dict(m.rsplit(":", 1)[0].split(":", 1) for m in args if m != "-v")
    assert mounts[str(tmp_path / "pip.conf")] == "/etc/pip.conf"
    conf = (tmp_path / "pip.conf").read_text()
    for source, target in mounts.items():
        assert source == str(tmp_path / "pip.conf") or target in conf, (source, target)
