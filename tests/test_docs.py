"""The documentation against the code: the configuration tables against `Settings`, and every link."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from proxy.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
TABLE_HEADER = ("variable", "default", "meaning")
EMPTY = "—"  # a default of "—" means empty: "" or ()
_NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`")
_LITERAL = re.compile(r"`([^`]*)`")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def config_rows(text: str) -> list[tuple[list[str], str]]:
    """(variable names, default cell) of every row of every `| variable | default | meaning |` table."""
    rows: list[tuple[list[str], str]] = []
    in_table = False
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if tuple(c.lower() for c in cells) == TABLE_HEADER:
            in_table = True
            continue
        if not in_table or set("".join(cells)) <= set("-: "):
            continue  # another table, or the separator row
        assert len(cells) == 3, f"a configuration row needs three cells: {line!r}"
        names = _NAME.findall(cells[0])
        assert names, f"a configuration row names no variable: {line!r}"
        rows.append((names, cells[1]))
    return rows


def normalise(value: object) -> str:
    """One spelling per value: 5 and 5.0 alike, booleans lower-case, lists comma-joined, empty as ''."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        number = float(text.replace("_", ""))
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def documented_defaults(rows: list[tuple[list[str], str]]) -> dict[str, str]:
    """Each variable's default as the doc gives it, normalised."""
    defaults: dict[str, str] = {}
    for names, cell in rows:
        if cell.startswith(EMPTY):
            values = [""] * len(names)
        else:
            values = _LITERAL.findall(cell)
            assert len(values) == len(names), (
                f"{' / '.join(names)}: give one `literal` default per variable, or {EMPTY} for empty; got {cell!r}"
            )
        for name, value in zip(names, values, strict=True):
            defaults[name] = normalise(value)
    return defaults


def settings_defaults() -> dict[str, str]:
    return {f.name.upper(): normalise(f.default) for f in dataclasses.fields(Settings)}


def test_every_setting_is_documented_once_and_nothing_else() -> None:
    rows = config_rows(CONFIGURATION.read_text())
    documented = [name for names, _ in rows for name in names]
    duplicates = sorted({name for name in documented if documented.count(name) > 1})
    assert not duplicates, f"documented twice: {duplicates}"
    expected = {f.name.upper() for f in dataclasses.fields(Settings)}
    assert set(documented) - expected == set(), "documented, but not a field of Settings"
    assert expected - set(documented) == set(), "fields of Settings missing from docs/configuration.md"


def test_documented_defaults_are_the_settings_defaults() -> None:
    documented = documented_defaults(config_rows(CONFIGURATION.read_text()))
    actual = settings_defaults()
    wrong = {
        name: (value, actual[name]) for name, value in documented.items() if name in actual and value != actual[name]
    }
    assert not wrong, f"(documented, actual) defaults that differ: {wrong}"


@pytest.mark.parametrize(
    "value, expected",
    [
        (5, "5"),
        (5.0, "5"),
        ("5.0", "5"),
        (0.8, "0.8"),
        ("0.8", "0.8"),
        (True, "true"),
        ("False", "false"),
        ((), ""),
        (("a", "b"), "a,b"),
        ("", ""),
        ("100_000", "100000"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_normalise(value: object, expected: str) -> None:
    assert normalise(value) == expected


def test_config_rows_reads_rows_naming_several_variables() -> None:
    text = (
        "| variable | default | meaning |\n| --- | --- | --- |\n| `A_B` / `C` | `5` / `6.0` | x |\n"
        "| `D`, `E` | — | y |\n\n| a | b |\n| `F` | `1` |\n"
    )
    rows = config_rows(text)
    assert rows == [(["A_B", "C"], "`5` / `6.0`"), (["D", "E"], "—")]
    assert documented_defaults(rows) == {"A_B": "5", "C": "6", "D": "", "E": ""}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, ...


def anchors_of(text: str) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _FENCE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def anchors(path: Path) -> set[str]:
    return anchors_of(path.read_text())


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(path: Path) -> None:
    missing, dangling = [], []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            dangling.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"
    assert not dangling, f"{path.relative_to(ROOT)} links to headings that do not exist: {dangling}"


def test_anchors_are_githubs() -> None:
    text = (
        "# Identity (JWT)\n## How requests end, and what they cost\n```\n# not a heading\n```\n"
        "## Runs (`LEDGER_WRITER`)\n"
    )
    assert anchors_of(text) == {"identity-jwt", "how-requests-end-and-what-they-cost", "runs-ledger_writer"}


def test_every_docs_page_is_linked_from_the_readme_and_the_index() -> None:
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    from_readme = {Path(t.split("#", 1)[0]).name for t in relative_links(ROOT / "README.md") if t.startswith("docs/")}
    from_index = {Path(t.split("#", 1)[0]).name for t in relative_links(DOCS / "README.md")}
    assert pages - from_readme == set(), "docs pages the README does not link"
    assert pages - from_index == set(), "docs pages docs/README.md does not link"
