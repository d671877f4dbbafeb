"""The user docs as a reader meets them: every ```python block of README.md and
docs/*.md runs as written, and the docs stay short and self-contained.

Blocks of one file run in order in one namespace (a reader runs them one after
the other); each file starts fresh. A block preceded by the line
`<!-- no-run -->` is skipped (it needs files or hardware the tests lack). The
blocks run on the CPU device, the one every machine has and the docs describe."""

from __future__ import annotations

import pathlib
import re
import textwrap

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = "<!-- no-run -->"
README_MAX_LINES = 250
# Paths outside the repo and internal issue numbers have no place in user docs.
FORBIDDEN = [
    re.compile(r"\.\./shared"),
    re.compile(r"/work/"),
    re.compile(r"\bissues? #?\d+", re.IGNORECASE),
]


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number of the opening fence, code, runs) for each ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"line {i + 1}: unclosed ```python block")
            runs = i == 0 or lines[i - 1].strip() != NO_RUN
            # A block inside a list item is indented like its fence.
            code = textwrap.dedent("\n".join(lines[start:end]) + "\n")
            blocks.append((i + 1, code, runs))
            i = end
        i += 1
    return blocks


def test_python_blocks_are_found():
    text = (
        "x\n<!-- no-run -->\n```python\na = 1\n```\n```sh\nls\n```\n```python\nb = 2\n```\n"
        "- item\n\n  ```python\n  c = 3\n  ```\n"
    )
    assert python_blocks(text) == [
        (3, "a = 1\n", False),
        (9, "b = 2\n", True),
        (14, "c = 3\n", True),
    ]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path):
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for line, code, runs in python_blocks(path.read_text()):
        if not runs:
            compile(code, f"{path.name}:{line}", "exec")  # still valid Python
            continue
        try:
            with jax.default_device(jax.devices("cpu")[0]):
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(
                f"{path.relative_to(ROOT)}, the python block at line {line} "
                f"failed: {type(e).__name__}: {e}"
            ) from e


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES} allowed"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_outside_paths_or_issue_numbers(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for pattern in FORBIDDEN:
            assert not pattern.search(line), (
                f"{path.relative_to(ROOT)}:{number} matches {pattern.pattern!r}: {line.strip()}"
            )


def test_forbidden_patterns_match():
    for text in ("see ../shared/DESIGN.md", "built in /work/main", "as in issue 16", "Issues #5"):
        assert any(p.search(text) for p in FORBIDDEN), text
    for text in ("docs/design.md", "an issue with q8_0", "work/items"):
        assert not any(p.search(text) for p in FORBIDDEN), text
