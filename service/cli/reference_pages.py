"""The manual's generated reference pages: written from the code, checked against it.

``python -m smoothcert.service.cli.reference_pages`` (``make docs-gen``) rewrites every page in
:data:`PAGES` from what the code says today; ``--check`` only compares and exits 1 naming each
stale page, which ``tests/test_docs.py`` does too (as the OpenAPI drift test does for
``openapi/openapi.json``):

- ``docs/reference/settings.md``: every field of :class:`~smoothcert.service.core.settings.Settings`
  (its environment variable, default and description);
- ``docs/reference/cli.md``: the ``--help`` of ``smoothcert`` and of every subcommand, from the
  argparse parsers (:func:`smoothcert.service.cli.main.build_parser`);
- ``docs/reference/http-api.md``: every operation and schema of ``openapi/openapi.json`` (which
  ``make openapi`` writes from the app);
- ``docs/reference/tsv.md``: the columns of the result TSV files (:mod:`~smoothcert.service.core.tsv`).

It lives in the CLI's layer because the CLI's parsers reach the worker's modules, which the dev
stack's layer may not import. The text is deterministic: help is formatted at a fixed width.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from smoothcert.service.core import tsv
from smoothcert.service.core.settings import Settings

COMMAND = "make docs-gen"
HELP_WIDTH = 100
OPENAPI = Path("openapi/openapi.json")


def _header(source: str) -> str:
    return (
        f"<!-- Generated from {source} by `{COMMAND}` "
        "(python -m smoothcert.service.cli.reference_pages); do not edit by hand. -->\n"
    )


def _cell(text: object) -> str:
    """One table cell: a single line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------
# Settings


def _size(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value:,} ({value >> shift} {unit})"
    return f"{value:,}"


def _default(name: str, value: Any) -> str:
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and ("bytes" in name or name == "redis_maxmemory"):
        return _size(int(value))
    if isinstance(value, int):
        return f"{value:,}" if value >= 10_000 else str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bounds(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{sign} {_default('', bound)}")
    annotation = str(field.annotation)
    if "Literal" in annotation:
        parts.append(" or ".join(repr(a) for a in field.annotation.__args__).replace("'", "`"))
    return ", ".join(parts)


def settings_page() -> str:
    """The table of every setting, in the order the class declares them."""
    prefix = Settings.model_config.get("env_prefix", "")
    lines = [
        _header("service/core/settings.py (the Settings class)"),
        "# Settings\n",
        "Every setting of the API, the workers and `smoothcert up` is an environment variable "
        f"with the `{prefix}` prefix (or a line of `docker/.env` for the compose deployment). "
        "A value outside its bounds stops the process at start-up with a message naming the "
        "variable. [Configuration](../operations/configuration.md) explains the keys, "
        "production mode and the settings read outside this class.\n",
        "| variable | field | default | bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        env = f"{prefix}{name.upper()}"
        lines.append(
            f"| `{env}` | `{name}` | {_cell(_default(name, field.default))} | "
            f"{_cell(_bounds(field))} | {_cell(field.description or '')} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The CLI


@contextlib.contextmanager
def _fixed_width() -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser below it, depth first in the order they were added."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # aliases share a parser
                    seen.add(id(sub))
                    yield from _subcommands(sub)


def cli_page() -> str:
    """``--help`` of ``smoothcert`` and of each subcommand, one section each."""
    from smoothcert.service.cli.main import build_parser  # the worker's modules come with it

    lines = [
        _header("the argparse parsers of service/cli"),
        "# Command line\n",
        "The `--help` of `smoothcert` and of every subcommand, as the command prints it. "
        "[The local CLI](../guide/local-cli.md) and [the remote CLI](../guide/remote-cli.md) "
        "show them at work.\n",
    ]
    with _fixed_width():
        for parser in _subcommands(build_parser()):
            lines += [f"## {parser.prog}\n", "```text", parser.format_help().rstrip(), "```\n"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The HTTP API


def _anchor(schema: str) -> str:
    return "schema-" + schema.lower()


def _type(schema: dict) -> str:
    """A schema as a short type expression; ``$ref`` links to the schema's section."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(name)})"
    if "anyOf" in schema or "oneOf" in schema:
        return " or ".join(_type(s) for s in schema.get("anyOf", schema.get("oneOf", [])))
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return f"object of {_type(extra) if isinstance(extra, dict) else 'any'}"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return str(kind)


def _limits(schema: dict) -> str:
    parts = []
    for key, sign in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("minItems", "items ≥"),
        ("maxItems", "items ≤"),
    ):
        if key in schema:
            parts.append(f"{sign} {schema[key]}")
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'], ensure_ascii=False)}`")
    return ", ".join(parts)


def _describe(text: str | None) -> str:
    """An operation's docstring as Markdown: RST's double backticks become code spans."""
    return (text or "").replace("``", "`").strip()


def _operation(method: str, path: str, op: dict) -> list[str]:
    lines = [f"### {method.upper()} {path}\n"]
    summary = op.get("summary", "")
    auth = "bearer key" if op.get("security") else "no key"
    lines.append(f"*{summary}* ({auth}; tag `{', '.join(op.get('tags', [])) or '-'}`)\n")
    if op.get("description"):
        lines.append(_describe(op["description"]) + "\n")
    params = op.get("parameters", [])
    if params:
        lines += [
            "| parameter | in | type | required | limits | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for p in params:
            schema = p.get("schema", {})
            lines.append(
                f"| `{p['name']}` | {p['in']} | {_cell(_type(schema))} | "
                f"{'yes' if p.get('required') else 'no'} | {_cell(_limits(schema))} | "
                f"{_cell(p.get('description', schema.get('description', '')))} |"
            )
        lines.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines.append(f"Request body (`{media}`): {_type(content.get('schema', {}))}\n")
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in op.get("responses", {}).items():
        bodies = [
            f"`{media}` {_type(content['schema'])}" if content.get("schema") else f"`{media}`"
            for media, content in response.get("content", {}).items()
        ]
        lines.append(
            f"| {status} | {_cell(response.get('description', ''))} | {_cell(', '.join(bodies))} |"
        )
    return lines + [""]


def _schema(name: str, schema: dict) -> list[str]:
    lines = [f"### {name} {{#{_anchor(name)}}}\n"]
    if schema.get("description"):
        lines.append(_describe(schema["description"]) + "\n")
    properties = schema.get("properties", {})
    if not properties:
        return lines + [f"Type: {_type(schema)}\n"]
    required = set(schema.get("required", []))
    lines += ["| field | type | required | limits | meaning |", "|---|---|---|---|---|"]
    for field, sub in properties.items():
        lines.append(
            f"| `{field}` | {_cell(_type(sub))} | {'yes' if field in required else 'no'} | "
            f"{_cell(_limits(sub))} | {_cell(sub.get('description', ''))} |"
        )
    return lines + [""]


def http_api_page(openapi: Path = OPENAPI) -> str:
    """Every operation (grouped by tag, in the document's path order) and every schema."""
    document = json.loads(openapi.read_text(encoding="utf-8"))
    info = document.get("info", {})
    lines = [
        _header(str(openapi)),
        "# HTTP API\n",
        f"{info.get('title', 'smoothcert')} API version {info.get('version', '?')}, from "
        f"`{openapi}` (OpenAPI {document.get('openapi', '?')}); the running service serves the "
        "same document at `/openapi.json`, and renders it at `/docs` (Swagger UI) and `/redoc`. "
        "A bearer key goes in `Authorization: Bearer KEY`. "
        "[The HTTP API with curl](../guide/http-api.md) shows the operations at work.\n",
        "## Operations\n",
    ]
    by_tag: dict[str, list[tuple[str, str, dict]]] = {}
    for path, operations in document.get("paths", {}).items():
        for method, op in operations.items():
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((method, path, op))
    for method, path, op in (entry for group in by_tag.values() for entry in group):
        lines += _operation(method, path, op)
    lines.append("## Schemas\n")
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += _schema(name, schema)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# TSV columns

COLUMN_MEANINGS = {
    "idx": "the input's index (its row in the inputs or the dataset)",
    "label": "the input's label; -1 without labels",
    "predict": "the smoothed classifier's class; -1 when it abstained",
    "radius": "the certified ℓ2 radius at full precision (0 when it abstained)",
    "correct": "1 when the prediction is the label, else 0 (0 without labels)",
    "time": "seconds spent on this input",
    "p_a_lower": "the lower confidence bound on p_A that the radius rests on",
    "n_a": "votes for the predicted class (predict: for the top class)",
    "n_b": "votes for the runner-up class",
    "n": "noisy samples counted (certify: the estimation samples, after the n0 selection ones)",
    "radius_cap": "the radius of a unanimous vote: no input can be certified further out with this n",
    "p_value": "the two-sided binomial test of the top class's count against the runner-up's",
    "certified_at_r": "1 when the input is certified at the target radius, else 0",
    "samples_used": "noisy samples the sequential test drew for this input (n0 included)",
    "target_radius": "the radius the run was asked about",
    "name": "the input's name (an image file's name, or the request's `names`); last column",
}


def tsv_page() -> str:
    """The columns of each kind of result TSV, in order, with what each holds."""
    lines = [
        _header("service/core/tsv.py"),
        "# Result TSV columns\n",
        "`smoothcert certify|predict --out FILE.tsv`, `smoothcert submit --out` and "
        "`GET /v1/jobs/{id}/results.tsv` write the same columns: Cohen et al.'s first, so their "
        "tools read our files, then ours. Inputs with names add a last `name` column. "
        "The run's provenance goes beside the file, as `FILE.tsv.json`.\n",
    ]
    tables = (
        ("certify", tsv.CERTIFY_COLUMNS),
        ("predict", tsv.PREDICT_COLUMNS),
        ("certify with a target radius", tsv.AT_RADIUS_COLUMNS),
    )
    for title, columns in tables:
        lines += [f"## {title}\n", "| # | column | meaning |", "|---|---|---|"]
        lines += [
            f"| {i} | `{c}` | {_cell(COLUMN_MEANINGS.get(c, ''))} |" for i, c in enumerate(columns)
        ]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

PAGES: dict[str, Callable[[], str]] = {
    "docs/reference/settings.md": settings_page,
    "docs/reference/cli.md": cli_page,
    "docs/reference/http-api.md": http_api_page,
    "docs/reference/tsv.md": tsv_page,
}


def stale_pages(root: Path = Path(".")) -> list[str]:
    """The generated pages under ``root`` whose text differs from what the code gives now."""
    stale = []
    for page, render in PAGES.items():
        path = root / page
        if not path.exists() or path.read_text(encoding="utf-8") != render():
            stale.append(page)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smoothcert.service.cli.reference_pages",
        description="Write (or --check) the manual's generated reference pages.",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1, naming each page, if any page is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"{page} is stale; run `{COMMAND}`", file=sys.stderr)
        return 1 if stale else 0
    for page, render in PAGES.items():
        path = Path(page)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(), encoding="utf-8")
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
