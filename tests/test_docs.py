"""README.md and the manual in docs/: every relative link and every anchor resolves (GitHub's
heading slugs), the README links every docs page and stays a five-minute read; what the pages
say a run writes is read here for the tests that compare it with real runs (issue 32)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from conftest import ROOT, compose_config

from mchad.registry import OSR_SETTINGS
from mchad.results.tables import safe_name

README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (link targets and markup dropped),
    lowercase, punctuation other than hyphens and underscores removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(text):
        heading = HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every Markdown link and image outside code."""
    found = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(root: Path) -> list[str]:
    """One line per relative link of README.md and docs/*.md whose file or anchor is missing."""
    problems = []
    for page in pages(root):
        for number, target in links(page.read_text(encoding="utf-8")):
            if SCHEME.match(target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(root).as_posix()}:{number}: {target}"
            file = (page.parent / unquote(path)).resolve() if path else page
            if not file.exists():
                problems.append(f"{where}: no such file")
            elif anchor and (file.suffix != ".md" or unquote(anchor) not in anchors(file.read_text(encoding="utf-8"))):
                problems.append(f"{where}: no heading with that anchor")
    return problems


def linked_pages(page: Path) -> set[Path]:
    targets = (t.partition("#")[0] for _, t in links(page.read_text(encoding="utf-8")))
    return {(page.parent / unquote(t)).resolve() for t in targets if t and not SCHEME.match(t)}


# ----------------------------------------------------------------------------- what the pages say runs write

OPENSET_NAME = re.compile(r"\bopenset_(<[^>]*>|\w+)")


def documented_result_columns(kind: str = "") -> list[str]:
    """results.csv's columns in the order docs/results.md lists them; ``kind`` (``open-set``,
    ``OpenOOD``) appends the last column that page names for such a run."""
    section = (ROOT / "docs" / "results.md").read_text(encoding="utf-8").split("\n## results.csv\n", 1)[1]
    listed = re.search(r"^Columns[^`]*`([^`]*)`", section, re.M)
    assert listed, "docs/results.md: no `Columns ... `a, b, ...`` line under ## results.csv"
    columns = listed.group(1).split(", ")
    if kind:
        extra = re.search(rf"`(\w+)` for an? {kind} run", section)
        assert extra, f"docs/results.md names no last column for an {kind} run"
        columns.append(extra.group(1))
    return columns


def readme_example_header() -> list[str]:
    """The header of the README's example results.csv table."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## What a run writes: results.csv\n", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in header.strip().strip("|").split("|")]


def documented_openset_files(page: str) -> tuple[set[str], set[str]]:
    """``(file names, placeholders)`` a page gives the open-set tables: ``openset_CIFAR10_6_4``
    and ``openset_<...>``."""
    found = OPENSET_NAME.findall((ROOT / "docs" / page).read_text(encoding="utf-8"))
    return {f"openset_{n}" for n in found if not n.startswith("<")}, {n for n in found if n.startswith("<")}


# ----------------------------------------------------------------------------- the project's pages


def test_every_link_and_anchor_resolves():
    assert (ROOT / "docs").is_dir() and len(pages(ROOT)) > 1
    assert broken_links(ROOT) == []


def test_readme_links_every_docs_page():
    docs = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert docs and docs - linked_pages(ROOT / "README.md") == set()


def test_readme_is_a_short_read_with_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert "python run.py" in readme
    assert re.search(r"^pip install -r requirements.txt && pytest\b", readme, re.M)


def test_open_set_table_names_are_those_the_code_gives_each_setting():
    """openset_<id_dataset> (each setting's datamodule.name) with other characters than [A-Za-z0-9_.-]
    as `_` (CIFAR+10: openset_CIFAR_10); a real aggregation's names: tests/test_openset.py."""
    titles = [compose_config([f"experiment=osr-{setting}-mchad"]).datamodule.name for setting in OSR_SETTINGS]
    expected = {f"openset_{safe_name(title)}" for title in titles}
    names, placeholders = documented_openset_files("open-set.md")
    assert names == expected and placeholders == {"<id_dataset>"}
    names, placeholders = documented_openset_files("results.md")
    assert names <= expected and placeholders == {"<id_dataset>"}


# ----------------------------------------------------------------------------- the checker itself


def test_slugs_follow_githubs_rules():
    assert slug("Reliability: what is guaranteed") == "reliability-what-is-guaranteed"
    assert slug("Seed sweeps and the paper's table") == "seed-sweeps-and-the-papers-table"
    assert slug("Multi-GPU and multi-node (DDP)") == "multi-gpu-and-multi-node-ddp"
    assert slug("`results.csv` and `scores.npz`") == "resultscsv-and-scoresnpz"
    assert slug("See [the docs](docs/a.md) — now") == "see-the-docs--now"
    assert slug("rng_state") == "rng_state"
    text = "# A\n## Usage\n```\n# Usage\n```\n### Usage\n## Usage ##\n"
    assert anchors(text) == {"a", "usage", "usage-1", "usage-2"}


def test_planted_broken_links_and_anchors_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Page A\n\n## Twice\n\n## Twice\n\nBack to the [README](../README.md#top) and [ok](#twice-1).\n"
        "A [bad anchor](#twice-2) here.\n",
        encoding="utf-8",
    )
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[good](docs/a.md) [good anchor](docs/a.md#twice-1) [web](https://example.org/x#y)\n"
        "[missing file](docs/missing.md) [bad anchor](docs/a.md#nowhere) [in page](#top) [bad in page](#bottom)\n"
        "`[in code](docs/nothing.md)`\n\n"
        "```\n[in a block](docs/nothing.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(tmp_path) == [
        "README.md:4: docs/missing.md: no such file",
        "README.md:4: docs/a.md#nowhere: no heading with that anchor",
        "README.md:4: #bottom: no heading with that anchor",
        "docs/a.md:8: #twice-2: no heading with that anchor",
    ]
    assert linked_pages(tmp_path / "README.md") == {(tmp_path / "docs" / p).resolve() for p in ("a.md", "missing.md")}
