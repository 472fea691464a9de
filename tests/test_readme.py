"""The README is a newcomer's first screen: install, the main job, the tests, then links.

Results, design notes and proofs live in docs/; these tests keep the README's test command
the one CI runs and every relative link of the README and docs/ pointing at something.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Written in parallel with the README's restructuring; a link to it may precede it.
PENDING = {ROOT / "docs" / "training.md"}


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_first_screen_is_install_main_job_tests_links() -> None:
    assert list(_sections(README.read_text())) == [
        "Install",
        "Score and evaluate NAS-Bench-201 architectures",
        "Tests",
        "More",
    ]


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_command = [line.strip() for line in ci if line.strip().startswith("python -m pytest")]
    assert len(ci_command) == 1
    block = re.search(r"```bash\n(.*?)```", _sections(README.read_text())["Tests"], re.S)
    assert block is not None
    assert ci_command[0] in block.group(1).splitlines()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            if linked not in PENDING:
                broken.append(target)
            continue
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", _without_code(linked.read_text()), flags=re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert broken == []
