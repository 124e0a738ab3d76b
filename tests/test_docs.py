"""The manual and the README: generated reference pages match the code, links resolve, one version.

The generated pages (docs/reference/settings.md, cli.md, http-api.md, tsv.md) are compared with
what ``make docs-gen`` would write now, as tests/service/api/test_openapi.py compares
openapi/openapi.json with the app. The README's relative links must name files that exist and
its ``#anchors`` headings that exist (GitHub's slugs). The build of the site itself (``mkdocs build
--strict``) is tests/browser/test_manual.py, which then opens it in a browser.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
import tomllib

from smoothcert.service import __version__
from smoothcert.service.cli import reference_pages
from tests.support.paths import ROOT

README = ROOT / "README.md"


@pytest.mark.parametrize("page", sorted(reference_pages.PAGES))
def test_a_generated_reference_page_is_what_the_code_gives(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    current = (ROOT / page).read_text(encoding="utf-8") if (ROOT / page).exists() else None
    fresh = reference_pages.PAGES[page]()
    assert current == fresh, f"{page} is stale; run `{reference_pages.COMMAND}`"


def test_the_check_names_each_stale_page_and_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no pages here: every one is stale
    (tmp_path / "openapi").mkdir()
    (tmp_path / "openapi" / "openapi.json").write_text((ROOT / "openapi/openapi.json").read_text())
    assert reference_pages.main(["--check"]) == 1
    err = capsys.readouterr().err
    for page in reference_pages.PAGES:
        assert f"{page} is stale; run `make docs-gen`" in err
    assert reference_pages.main([]) == 0
    assert reference_pages.main(["--check"]) == 0


def test_the_settings_page_names_every_setting_with_its_env_variable_and_default():
    text = reference_pages.settings_page()
    from smoothcert.service.core.settings import Settings

    for name, field in Settings.model_fields.items():
        [row] = [line for line in text.splitlines() if f"| `{name}` |" in line]
        assert row.startswith(f"| `SMOOTHCERT_{name.upper()}` |")
        assert field.description and " ".join(field.description.split())[:40] in row, (
            f"Settings.{name} needs a description: the manual's table shows it"
        )
    assert "| `SMOOTHCERT_MAX_REQUEST_BYTES` | `max_request_bytes` | 67,108,864 (64 MiB) |" in text


def test_the_cli_page_holds_every_subcommands_help():
    text = reference_pages.cli_page()
    for command in ("certify", "predict", "submit", "models upload", "keys create", "verify"):
        assert f"## smoothcert {command}\n" in text
    assert "usage: smoothcert certify [-h]" in text
    assert "--target-radius R" in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lowercase, punctuation dropped, spaces as '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(markdown: str) -> list[str]:
    without_code = re.sub(r"```.*?```", "", markdown, flags=re.S)
    without_code = re.sub(r"`[^`\n]*`", "", without_code)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code)


def test_every_relative_link_and_anchor_of_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    links = _links(text)
    assert any(link.startswith("docs/") for link in links)  # it links into the manual
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (README.parent / unquote(target)) if target else README
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md":
            if anchor not in _anchors(path.read_text(encoding="utf-8")):
                broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "README.md links that do not resolve:\n" + "\n".join(broken)


def test_the_anchor_check_can_fail():
    assert "what-a-certificate-means" in _anchors("# What a certificate means\n")
    assert "x-1" in _anchors("## x\n## x\n")
    assert "not-there" not in _anchors("# There\n")


def test_the_readme_is_a_landing_page_that_leads_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert "make up" in first_block and "make test" in first_block


def test_the_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "smoothcert.service.__version__"
    openapi = (ROOT / "openapi/openapi.json").read_text()
    assert f'"version": "{__version__}"' in openapi


def test_the_license_file_is_the_license_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
