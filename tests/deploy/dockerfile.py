"""Just enough Dockerfile and .env reading for the deployment tests (no docker engine here)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# pip options that take a value, so the value is not mistaken for a requirement.
PIP_VALUE_OPTIONS = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-t",
    "--target",
    "--wheel-dir",
    "-w",
}


def instructions(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile as (INSTRUCTION, arguments) lists: [0] holds the global ARGs before the
    first FROM (maybe none), then one list per stage, the last being the image. Comment lines
    are dropped first, as Docker drops them before joining continuation lines."""
    lines = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        op, _, args = line.strip().partition(" ")
        op = op.upper()
        if op == "FROM":
            stages.append([])
        stages[-1].append((op, " ".join(args.split())))
    return stages


def arg_defaults(stages: list[list[tuple[str, str]]], index: int) -> dict[str, str]:
    """ARG defaults in force in a stage: the global ones, then the stage's own."""
    defaults = {}
    for op, args in stages[0] + stages[index]:
        if op == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def expand(text: str, defaults: dict[str, str]) -> str:
    """Fill ``$NAME`` and ``${NAME}`` from ARG defaults; other variables stay as they are."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def resolve_from(stages: list[list[tuple[str, str]]], index: int) -> str:
    """The image a stage starts from, with ``${ARG}`` filled from the global ARG defaults."""
    image = next(args for op, args in stages[index] if op == "FROM").split()[0]
    return expand(image, arg_defaults(stages, 0))


@dataclass
class PipInstall:
    """One `pip install` command of a RUN instruction."""

    requirements: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)

    def option(self, name: str) -> str | None:
        return self.values.get(name)


def image_installs(stages: list[list[tuple[str, str]]], index: int) -> list[PipInstall]:
    """Every ``pip install`` (or ``python -m pip install``) in a stage's RUN instructions, with
    the ARG defaults filled in."""
    found, defaults = [], arg_defaults(stages, index)
    for op, args in stages[index]:
        if op != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", expand(args, defaults)):
            words = shlex.split(command)
            for start in range(len(words) - 1):
                if words[start] in ("pip", "pip3") and words[start + 1] == "install":
                    found.append(_pip_install(words[start + 2 :]))
                    break
    return found


def _pip_install(words: list[str]) -> PipInstall:
    install, pending = PipInstall(), None
    for word in words:
        if pending:
            install.values[pending] = word
            pending = None
        elif word.startswith("-"):
            name, eq, value = word.partition("=")
            install.options.append(name)
            if name in PIP_VALUE_OPTIONS:
                if eq:
                    install.values[name] = value
                else:
                    pending = name
        else:
            install.requirements.append(word)
    return install


def requirement_name(requirement: str) -> str:
    """The normalized project name of a requirement string (``celery[redis]>=5.3`` -> ``celery``)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else requirement


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file; comments and blank lines skipped."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values
