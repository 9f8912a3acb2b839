"""Every file the lessons, the README and the docs send a reader to exists in the repository, and nothing points out.

A citation is a Markdown link (``[text](path)``, relative to the file it is in) or a path of the repository
written out (``docs/contract.md``, ``labkit/backends/kafka/quirks.py``, backticked or not, relative to the
repository's root). The lab must be complete in itself (BRIEF: "NO file in the repository may point outside
it"), so no file it tracks may name the notes it was built from, a folder above it, or a machine's path.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Where readers follow citations: the README, the docs and every notebook (lessons and exercises).
READER_FILES = sorted(
    [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("notebooks/**/*.ipynb")],
    key=lambda p: str(p),
)
#: The repository's top-level folders: a path starting with one of them is a citation of the repository.
TOP_LEVEL = ("docs", "labkit", "notebooks", "tests", "benchmarks", "workers", ".ci")
TOP_FILES = ("README.md", "pyproject.toml", "docker-compose.yml", "environment.yml")
#: ``[text](target)``; images too.
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: A path of the repository written out, from its root: ``docs/x.md``, ``labkit/lessons/``, ``../docs/x.md``.
REPO_PATH = re.compile(
    r"(?<![\w/.$<{-])((?:\.\./)*(?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")(?:/[\w.*<>{}$-]+)+/?)"
)
#: A path that stands for many (``notebooks/NN-name.ipynb``, ``workers/<backend>.py``): not one file to find.
PLACEHOLDER = re.compile(r"\bNN\b|[<>*{}$]")
#: Names that point outside the repository: the shared notes it was built from, folders above it, a machine.
OUTSIDE = re.compile(
    r"(?<![\w/.-])(?:CONTRACT|EMBEDDED-KAFKA|APACHE-KAFKA)\.md"  # the shared notes (docs/contract.md is ours)
    r"|\.\./shared|/work/(?:shared|main|wt)\b"
)


def reader_text(path: Path) -> str:
    """What a reader reads in ``path``: a notebook's markdown and code, or the file's text."""
    if path.suffix != ".ipynb":
        return path.read_text(encoding="utf-8")
    notebook = nbformat.read(path, as_version=4)
    return "\n".join(cell.source for cell in notebook.cells)


def markdown_links(text: str) -> list[str]:
    """Relative link targets of ``text``, anchors dropped (web, mail and in-page links are not files)."""
    targets = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return [t for t in targets if t]


def repository_paths(text: str) -> list[str]:
    """Paths of the repository written out in ``text`` (see :data:`REPO_PATH`), placeholders left out."""
    found = [m.rstrip(".,;:") for m in REPO_PATH.findall(text)]
    found += re.findall(r"(?<![\w/.-])(" + "|".join(re.escape(f) for f in TOP_FILES) + r")\b", text)
    return [p for p in found if not PLACEHOLDER.search(p)]


def inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def tracked_text_files() -> list[Path]:
    """Every file git tracks or would add (not ignored), that is text."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    files = []
    for name in listed:
        path = ROOT / name
        if path.is_file() and path.suffix not in {".png", ".jpg", ".gz", ".whl", ".jar"}:
            files.append(path)
    return files


def test_the_scan_finds_what_it_looks_for() -> None:
    text = (
        "See [lesson 01](01-producers.ipynb#top) and [docs](https://example.org/x.md), the contract in\n"
        "`docs/contract.md`, the quirks in labkit/backends/kafka/quirks.py, `python benchmarks/lessons.py 07`,\n"
        "one per lesson in `notebooks/NN-name.ipynb`, and `pyproject.toml`."
    )
    assert markdown_links(text) == ["01-producers.ipynb"]
    assert repository_paths(text) == ["docs/contract.md", "labkit/backends/kafka/quirks.py", "benchmarks/lessons.py",
                                      "pyproject.toml"]  # fmt: skip
    for outside in ("../shared/CONTRACT.md", "see EMBEDDED-KAFKA.md", "/work/shared/APACHE-KAFKA.md"):
        assert OUTSIDE.search(outside), outside
    assert not OUTSIDE.search("the wire contract is in docs/contract.md")


def test_there_are_files_to_read() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in READER_FILES}
    assert {"README.md", "docs/contract.md", "docs/architecture.md", "notebooks/00-welcome.ipynb"} <= names


@pytest.mark.parametrize("path", READER_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_and_cited_file_exists_in_the_repository(path: Path) -> None:
    text = reader_text(path)
    missing = []
    for target in markdown_links(text):
        resolved = (path.parent / target).resolve()
        if not inside(resolved) or not resolved.exists():
            missing.append(f"link {target!r}")
    for cited in repository_paths(text):
        resolved = (ROOT / cited).resolve()
        if not inside(resolved) or not resolved.exists():
            missing.append(f"cited {cited!r}")
    assert not missing, f"{path.relative_to(ROOT)} sends the reader nowhere: {missing}"


def test_no_file_of_the_repository_points_outside_it() -> None:
    this = Path(__file__).resolve()
    pointing = []
    for path in tracked_text_files():
        if path.resolve() == this:
            continue  # names the outside only to look for it
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE.search(line):
                pointing.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not pointing, (
        "point inside the repository instead (docs/contract.md, docs/embedded-kafka.md):\n" + "\n".join(pointing)
    )
