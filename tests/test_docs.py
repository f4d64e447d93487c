"""The README and docs/ hold together: every command has a row, every relative link lands."""

import re
from pathlib import Path

import pytest

from yalm_runner.cli import COMMANDS

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.MULTILINE)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    # Headings only: fenced code may hold "# comment" lines, which are not headings.
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {github_anchor(heading) for heading in HEADING.findall(text)}


def test_every_yalm_runner_command_has_a_row_in_the_readme_command_table():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        row = re.compile(rf"^\| `yalm-runner {re.escape(name)}( [^`]*)?` \|", re.MULTILINE)
        assert row.search(readme), f"README's command table does not document `{name}`"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_lands_on_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


def test_the_docs_pages_are_linked_from_the_readme():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
