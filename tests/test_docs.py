"""The repository stands alone: its documents link only to files inside it that exist."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

DOCUMENTS = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    REPO / "CHANGELOG.md",
    *sorted((REPO / "docs").glob("*.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_stays_in_the_repository_and_exists(document):
    text = document.read_text()
    assert "../shared" not in text and "DESIGN.md" not in text
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (document.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(REPO), f"{document.name} links outside the repository: {target}"
        assert path.exists(), f"{document.name} links to a missing file: {target}"


def test_the_design_is_in_the_repository():
    text = (REPO / "docs/architecture.md").read_text()
    for section in (
        "Threat model",
        "The flow of one request",
        "Three ways an answer leaves",
        "Trust boundaries",
        "Module layout",
    ):
        assert f"## {section}" in text
    assert "docs/architecture.md" in (REPO / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` is the README's one test command, checks included, and CONTRIBUTING.md shows
    the same, so they cannot drift apart."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("Run the checks and the tests", 1)[1]
    command = re.search(r"```sh\n(.+?)\n```", section, re.S).group(1).strip()
    assert "\n" not in command  # one command a user can copy
    for step in ("ruff check .", "ruff format --check .", "/mypy", "pytest"):
        assert step in command
    assert command.index("mypy") < command.index("pytest")  # the checks first
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command
    assert command in (REPO / "CONTRIBUTING.md").read_text()
