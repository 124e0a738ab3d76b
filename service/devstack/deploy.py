"""``make deploy-up`` / ``make deploy-down``: the compose deployment, CPU flavour, on this machine.

docker/docker-compose.yml with docker/compose.cpu.yml on top: Redis, the API, two certify
workers and the trainer, in containers. The engine is Docker where a Docker engine answers
(``docker info`` succeeds, ``docker compose`` runs the files) and podman otherwise, run through
podman-compose with the project's docker/podman/containers.conf (``CONTAINERS_CONF``).

Where the engine is podman no image can be pulled: the base images are built here when they
are missing, from Debian packages (``debootstrap --variant=minbase bookworm``, imported with
``podman import``, then docker/base/*.Dockerfile for Python and Redis), and the builds of the
api and worker images get the host's CA bundle and its pip ``find-links`` folder (where the CPU
torch wheel lies) mounted, with a pip.conf naming both. Docker builds from its registry's images.

Settings: docker/.env (created from docker/.env.example with fresh random keys and Redis password
when missing), then every ``SMOOTHCERT_*`` variable of the environment, which wins: compose
reads the environment first for the ``${...}`` of the files, and a generated override
(``var/deploy/<project>/local.yml``) hands the same values to the containers.
State and caches live under ``var/deploy/`` of the checkout (gitignored).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from smoothcert.service.devstack.credentials import key_lines

DEFAULT_PROJECT = "smoothcert"
CERTIFY_WORKERS = 2
DEBIAN_IMAGE = "localhost/smoothcert-debian:bookworm"
PYTHON_IMAGE = "localhost/smoothcert-python:3.11-bookworm"
REDIS_IMAGE = "localhost/smoothcert-redis:7-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PACKAGE_INDEX = "https://pypi.org/simple"
# Where a build sees the host's CA bundle and wheel folder (not the host's own paths: the image's
# ca-certificates package writes /etc/ssl/certs during the build).
BUILD_MOUNT = "/opt/smoothcert-build"
SECRETS = (
    "SMOOTHCERT_API_KEY",
    "SMOOTHCERT_ADMIN_KEY",
    "SMOOTHCERT_KEY_PEPPER",
    "SMOOTHCERT_REDIS_PASSWORD",
)
PLACEHOLDERS = {"", "change-me", "changeme", "secret", "password"}
READY_TIMEOUT_S = 300.0


class DeployError(RuntimeError):
    """A step of the deployment failed; the message says which and why."""


@dataclass
class Engine:
    """The container engine and how to run compose with it."""

    name: str  # "docker" or "podman"
    env: dict[str, str] = field(default_factory=dict)

    def compose_command(self) -> list[str]:
        if self.name == "docker":
            return ["docker", "compose"]
        return [sys.executable, "-m", "podman_compose", "--in-pod", "false"]


def docker_engine_answers() -> bool:
    """True when a Docker engine (not only the client) answers and has the compose plugin."""
    if shutil.which("docker") is None:
        return False
    for probe in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
                return False
        except (OSError, subprocess.TimeoutExpired):
            return False
    return True


def detect_engine(root: Path) -> Engine:
    """Docker when its engine answers, else podman (which must be installed: `make deploy-tools`)."""
    if docker_engine_answers():
        return Engine("docker", dict(os.environ))
    if shutil.which("podman") is None:
        raise DeployError(
            "no Docker engine answers and podman is not installed; `make deploy-tools` installs it "
            "(apt-get install podman runc debootstrap)"
        )
    try:
        import podman_compose  # noqa: F401 - only whether it is there
    except ImportError:
        raise DeployError("podman-compose is missing: pip install '.[deploy]'") from None
    return Engine(
        "podman",
        {**os.environ, "CONTAINERS_CONF": str(root / "docker" / "podman" / "containers.conf")},
    )


# --- settings ----------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; comments and blank lines skipped."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def ensure_env_file(root: Path, environ: dict[str, str]) -> tuple[Path, bool]:
    """docker/.env, written from docker/.env.example when missing: each secret from the
    environment or a fresh random one. Returns the path and whether it was created."""
    path = root / "docker" / ".env"
    if path.exists():
        return path, False
    lines = []
    for line in (root / "docker" / ".env.example").read_text(encoding="utf-8").splitlines():
        key = line.partition("=")[0].strip()
        if key in SECRETS and not line.lstrip().startswith("#"):
            line = f"{key}={environ.get(key) or secrets.token_urlsafe(32)}"
        lines.append(line)
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, True


def effective_settings(env_file: Path, environ: dict[str, str]) -> dict[str, str]:
    """docker/.env with the environment's SMOOTHCERT_* variables on top; refuses placeholder secrets."""
    values = {
        **read_env_file(env_file),
        **{k: v for k, v in environ.items() if k.startswith("SMOOTHCERT_")},
    }
    weak = [k for k in SECRETS if values.get(k, "").lower() in PLACEHOLDERS]
    if weak:
        raise DeployError(
            f"{', '.join(weak)} still {'have' if len(weak) > 1 else 'has'} the example value in "
            f"{env_file}; set them there or in the environment (or delete the file to get random ones)"
        )
    return values


def local_override(path: Path, environ: dict[str, str]) -> Path:
    """A compose file that hands the environment's SMOOTHCERT_* variables to the app containers,
    over their env_file (docker/.env), and runs CERTIFY_WORKERS workers (in the file, so that
    ``down`` knows every replica too). JSON is YAML; ``$`` is doubled against interpolation."""
    passed = {
        k: v.replace("$", "$$") for k, v in sorted(environ.items()) if k.startswith("SMOOTHCERT_")
    }
    services: dict[str, dict] = {
        name: {"environment": passed} for name in ("api", "worker", "trainer")
    }
    services["worker"]["scale"] = CERTIFY_WORKERS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps({"services": services}, indent=2) + "\n", encoding="utf-8")
    return path


# --- images --------------------------------------------------------------------------------------


def run(args: list[str], env: dict[str, str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a step, its output on the terminal; DeployError naming ``what`` when it fails."""
    done = subprocess.run(args, env=env, **kwargs)
    if done.returncode != 0:
        raise DeployError(f"{what} failed (exit {done.returncode}): {' '.join(args)}")
    return done


def podman_image_exists(engine: Engine, image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=engine.env).returncode == 0


def build_base_images(engine: Engine, root: Path, state: Path) -> None:
    """The Debian, Python and Redis base images, each built only when missing (podman)."""
    if not podman_image_exists(engine, DEBIAN_IMAGE):
        if os.geteuid() != 0:
            raise DeployError(
                "building the Debian base image needs root (debootstrap); run as root or with sudo"
            )
        rootfs = state / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        print(f"building {DEBIAN_IMAGE} with debootstrap (about a minute) ...", flush=True)
        run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
            engine.env,
            "debootstrap",
            stdout=subprocess.DEVNULL,
        )
        # apt in a build must not try to start the services it installs (there is no init)
        policy = rootfs / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(
            ["podman", "import", "-q", "-", DEBIAN_IMAGE],
            engine.env,
            "podman import",
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
        )
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    for image, dockerfile in (
        (PYTHON_IMAGE, "python.Dockerfile"),
        (REDIS_IMAGE, "redis.Dockerfile"),
    ):
        if not podman_image_exists(engine, image):
            print(f"building {image} ...", flush=True)
            run(
                [
                    "podman",
                    "build",
                    "-q",
                    "--build-arg",
                    f"DEBIAN_IMAGE={DEBIAN_IMAGE}",
                    "-f",
                    str(root / "docker" / "base" / dockerfile),
                    "-t",
                    image,
                    str(root / "docker" / "base"),
                ],
                engine.env,
                f"building {image}",
                stdout=subprocess.DEVNULL,
            )


@functools.lru_cache(maxsize=1)
def host_pip_config() -> dict[str, str]:
    """``cert`` and ``find-links`` of this interpreter's pip configuration (environment included)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        if name in ("cert", "find-links"):
            found.setdefault(name, value.strip().strip("'\""))
    return found


def local_torch_wheel(config: dict[str, str]) -> Path | None:
    """The CPU torch wheel in the host's find-links folder, if one lies there."""
    for folder in config.get("find-links", "").split():
        if Path(folder).is_dir():
            wheel = next(iter(sorted(Path(folder).glob("torch-*+cpu-*.whl"))), None)
            if wheel is not None:
                return wheel
    return None


def podman_build_args(state: Path) -> str:
    """The -v mounts that give a build the host's CA bundle and wheel folder, and a pip.conf for them."""
    config = host_pip_config()
    mounts, pip_conf = [], ["[global]"]
    cert = config.get("cert") or next(
        (p for p in ("/etc/ssl/certs/ca-certificates.crt",) if Path(p).exists()), ""
    )
    if cert and Path(cert).is_file():
        mounts.append(f"-v {cert}:{BUILD_MOUNT}/ca-bundle.crt:ro")
        pip_conf.append(f"cert = {BUILD_MOUNT}/ca-bundle.crt")
    links = [p for p in config.get("find-links", "").split() if Path(p).is_dir()]
    if links:
        mounts.append(f"-v {links[0]}:{BUILD_MOUNT}/wheels:ro")
        pip_conf.append(f"find-links = {BUILD_MOUNT}/wheels")
    conf = state / "pip.conf"
    conf.write_text("\n".join(pip_conf) + "\n", encoding="utf-8")
    mounts.append(f"-v {conf}:/etc/pip.conf:ro")
    return " ".join(mounts)


# --- the deployment --------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One compose project of the CPU flavour: its engine, files and settings."""

    root: Path
    project: str = DEFAULT_PROJECT
    engine: Engine = field(default_factory=lambda: Engine("podman"))
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def state(self) -> Path:
        return self.root / "var" / "deploy"

    def compose(self, *args: str) -> list[str]:
        docker = self.root / "docker"
        files = [
            docker / "docker-compose.yml",
            docker / "compose.cpu.yml",
            self.state / self.project / "local.yml",
        ]
        return [
            *self.engine.compose_command(),
            "--project-name",
            self.project,
            *[a for f in files for a in ("-f", str(f))],
            "--profile",
            "train",
            *args,
        ]

    def env(self) -> dict[str, str]:
        env = {**self.engine.env, **self.environ}
        if self.engine.name == "podman":
            env |= {
                "CONTAINERS_CONF": self.engine.env["CONTAINERS_CONF"],
                "PYTHON_IMAGE": PYTHON_IMAGE,
                "RUNTIME_IMAGE": DEBIAN_IMAGE,
                "REDIS_IMAGE": REDIS_IMAGE,
            }
            # The local CPU wheel outranks the index's torch of the same version (its +cpu local
            # label sorts higher); the index then serves only torch's own dependencies.
            if local_torch_wheel(host_pip_config()) is not None:
                env.setdefault("TORCH_INDEX_URL", PACKAGE_INDEX)
        return env

    def prepare(self) -> dict[str, str]:
        """docker/.env and the environment override; the effective settings."""
        env_file, created = ensure_env_file(self.root, self.environ)
        if created:
            print(
                f"wrote {env_file} from docker/.env.example with random keys and Redis password",
                flush=True,
            )
        settings = effective_settings(env_file, self.environ)
        local_override(self.state / self.project / "local.yml", self.environ)
        return settings

    def build(self) -> None:
        """The base images (podman, when missing), then the api and worker images (cached layers)."""
        self.state.mkdir(parents=True, exist_ok=True)
        extra: list[str] = []
        if self.engine.name == "podman":
            build_base_images(self.engine, self.root, self.state)
            extra = [f"--podman-build-args={podman_build_args(self.state)}"]
        command = self.compose()
        at = command.index("--project-name")
        for service in (
            "api",
            "worker",
        ):  # one after the other: the worker's trainer twin reuses its image
            run(
                [*command[:at], *extra, *command[at:], "build", service],
                self.env(),
                f"building the {service} image",
            )

    def up(self) -> None:
        run(
            self.compose("up", "-d", "--scale", f"worker={CERTIFY_WORKERS}"),
            self.env(),
            "starting the deployment",
        )

    def down(self, volumes: bool = False) -> None:
        run(
            self.compose("down", *(["--volumes"] if volumes else [])),
            self.env(),
            "stopping the deployment",
        )
        if self.engine.name == "podman":
            self._podman_leftovers(volumes)

    def _podman_leftovers(self, volumes: bool) -> None:
        """What podman-compose's down can leave behind: containers it did not start itself
        (started again by hand), the network, and with ``volumes`` the named volumes."""
        env, label = self.env(), f"label=com.docker.compose.project={self.project}"

        def quiet(*args: str) -> None:
            subprocess.run(
                list(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )

        # dependents (--requires) go with --depend; a second pass catches the rest
        for _ in range(3):
            left = self.containers(all_states=True)
            if not left:
                break
            quiet("podman", "rm", "-f", "--depend", *left)
        quiet("podman", "network", "rm", "-f", f"{self.project}_default")
        if volumes:
            names = subprocess.run(
                ["podman", "volume", "ls", "-q", "--filter", label],
                env=env,
                capture_output=True,
                text=True,
            ).stdout.split()
            if names:
                quiet("podman", "volume", "rm", "-f", *names)

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        """Names of the project's containers (of ``service``), sorted."""
        args = [
            self.engine.name,
            "ps",
            "--format",
            "{{.Names}}",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
        ]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            args.append("--all")
        out = subprocess.run(
            args, env=self.env(), capture_output=True, text=True, check=True
        ).stdout
        return sorted(out.split())

    def logs(self, container: str, lines: int = 30) -> str:
        done = subprocess.run(
            [self.engine.name, "logs", "--tail", str(lines), container],
            env=self.env(),
            capture_output=True,
            text=True,
        )
        return done.stdout + done.stderr


def url_of(settings: dict[str, str]) -> str:
    host = settings.get("SMOOTHCERT_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{settings.get('SMOOTHCERT_PORT', '8000')}"


def ready_workers(url: str, api_key: str) -> dict[str, list[str]]:
    """Live workers by queue, from ``/readyz`` ({} while not ready)."""
    resp = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {api_key}"}, timeout=5)
    if resp.status_code != 200:
        return {}
    by_queue: dict[str, list[str]] = {}
    for worker in resp.json().get("worker_details", []):
        for queue in worker.get("queues", []):
            by_queue.setdefault(queue, []).append(worker["name"])
    return by_queue


def wait_ready(
    deployment: Deployment, settings: dict[str, str], timeout: float = READY_TIMEOUT_S
) -> dict:
    """Wait until /readyz lists both certify workers and the trainer; DeployError with logs if not."""
    url, key = url_of(settings), settings["SMOOTHCERT_API_KEY"]
    deadline, workers = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            workers = ready_workers(url, key)
        except httpx.HTTPError:
            workers = {}
        if len(workers.get("certify", [])) >= CERTIFY_WORKERS and workers.get("train"):
            return workers
        exited = set(deployment.containers(all_states=True)) - set(deployment.containers())
        if exited:
            name = sorted(exited)[0]
            raise DeployError(f"container {name} exited:\n{deployment.logs(name)}")
        time.sleep(1)
    tails = "\n".join(f"--- {c}\n{deployment.logs(c, 10)}" for c in deployment.containers())
    raise DeployError(
        f"{url}/readyz did not list {CERTIFY_WORKERS} certify workers and the trainer within "
        f"{timeout:.0f} s (it lists {workers}):\n{tails}"
    )


def register_demo(url: str, admin_key: str, demo_dir: Path) -> dict:
    """The digits demo model uploaded through the API, public, so the user key may certify with
    it (reused when an identical public one is stored)."""
    from smoothcert.models.demo import build_demo  # torch, only in this process
    from smoothcert.models.metadata import sha256_file

    path = demo_dir / "digits_cnn.safetensors"
    if not path.exists():
        build_demo(demo_dir, seed=0)
    headers, sha = {"Authorization": f"Bearer {admin_key}"}, sha256_file(path)
    for model in httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json():
        if (
            model.get("name") == "digits-demo"
            and model.get("sha256") == sha
            and model.get("visibility", "public") == "public"
        ):
            return model
    with open(path, "rb") as f:
        resp = httpx.post(
            f"{url}/v1/models",
            headers=headers,
            timeout=200,
            files={"file": (path.name, f)},
            data={"name": "digits-demo", "visibility": "public"},
        )
    if resp.status_code != 201:
        raise DeployError(f"uploading the demo model failed: {resp.status_code} {resp.text}")
    return resp.json()


def banner(deployment: Deployment, settings: dict[str, str], model: dict) -> str:
    """What ``deploy-up`` prints: where the API is, the two keys, and a certify request to paste."""
    url, key = url_of(settings), settings["SMOOTHCERT_API_KEY"]
    auth = f'-H "Authorization: Bearer {key}"'
    import numpy as np

    image = np.load(deployment.state / "demo" / "digits_test_x.npy")[0].round(4).tolist()
    body = json.dumps(
        {"model_id": model["id"], "inputs": image, "sigma": 0.25, "n": 10000}, separators=(",", ":")
    )
    return "\n".join(
        [
            f"smoothcert is up at {url}  (docs: {url}/docs; {deployment.engine.name} compose project "
            f"{deployment.project}: {', '.join(deployment.containers())})",
            *key_lines(
                key,
                settings["SMOOTHCERT_ADMIN_KEY"],
                [name for name in SECRETS if deployment.environ.get(name)],
                str(deployment.root / "docker" / ".env"),
                "`make deploy-down`, then `make deploy-up`",
            ),
            f"demo model: {model['id']} ({model.get('name')}, input {model.get('input_shape')})",
            "",
            "certify one test digit:",
            f"  curl -s {auth} -H 'Content-Type: application/json' -d '{body}' {url}/v1/certify",
            "then poll the job it names:",
            f"  curl -s {auth} {url}/v1/jobs/JOB_ID",
            f"health and numbers (no key): {url}/readyz  {url}/metrics",
            "",
            "`make deploy-down` stops it (the data and Redis volumes stay).",
        ]
    )


def check_port(settings: dict[str, str]) -> None:
    if not re.fullmatch(r"\d{1,5}", settings.get("SMOOTHCERT_PORT", "8000")):
        raise DeployError(
            f"SMOOTHCERT_PORT must be a port number, not {settings['SMOOTHCERT_PORT']!r}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smoothcert.service.devstack.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "build", "engine"))
    parser.add_argument(
        "--project", default=DEFAULT_PROJECT, help="compose project name (default: smoothcert)"
    )
    parser.add_argument(
        "--volumes", action="store_true", help="down: also delete the data and Redis volumes"
    )
    parser.add_argument("--no-demo", action="store_true", help="up: do not upload the demo model")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if not (root / "docker" / "docker-compose.yml").exists():
        print(
            "run this from the repository root (docker/docker-compose.yml not found)",
            file=sys.stderr,
        )
        return 2
    try:
        deployment = Deployment(root, args.project, detect_engine(root))
        if args.command == "engine":
            print(deployment.engine.name)
            return 0
        settings = deployment.prepare()
        if args.command == "down":
            deployment.down(volumes=args.volumes)
            return 0
        check_port(settings)
        deployment.build()
        if args.command == "build":
            return 0
        deployment.up()
        wait_ready(deployment, settings)
        if not args.no_demo:
            model = register_demo(
                url_of(settings), settings["SMOOTHCERT_ADMIN_KEY"], deployment.state / "demo"
            )
            print(banner(deployment, settings, model), flush=True)
        return 0
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
