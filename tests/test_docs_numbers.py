"""Every benchmark figure the README and the docs show is the one in its result file.

The tables stand between `<!-- table: NAME -->` markers (`benchmarks/tables.py`
renders them from `benchmarks/results/`); each shown cell is compared with the
cell computed from the JSON, and a benchmark table written by hand, outside
markers, is refused.
"""

import json
import pathlib
import shutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402


def _table_lines(body: str) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.strip()[1:-1].split(" | ")]
        for line in body.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    return rows


def mismatches(text: str, results: pathlib.Path, where: str) -> list[str]:
    """What `text`'s blocks show that their result files do not say."""
    found = []
    for match in tables.BLOCK.finditer(text):
        name, body = match.group("name"), match.group("body")
        if name not in tables.TABLES:
            found.append(f"{where}: unknown table {name!r}")
            continue
        shown, expected = _table_lines(body), tables.cells(name, results)
        if len(shown) != len(expected):
            found.append(
                f"{where}: table {name} shows {len(shown) - 1} rows, "
                f"{tables.TABLES[name].source} has {len(expected) - 1}"
            )
        for r, (got_row, want_row) in enumerate(zip(shown, expected, strict=False)):
            if len(got_row) != len(want_row):
                found.append(f"{where}: table {name}, row {r}: {got_row}")
            for header, got, want in zip(expected[0], got_row, want_row, strict=False):
                if got != want:
                    found.append(
                        f"{where}: table {name}, row {r}, column {header!r} shows "
                        f"{got!r}; {tables.TABLES[name].source} gives {want!r}"
                    )
        if tables.note(name, results) not in body:
            found.append(f"{where}: table {name} lacks its note on how it was computed")
    return found


def _unmarked_tables(text: str, where: str) -> list[str]:
    outside = tables.BLOCK.sub("", text)
    headers = {
        "| " + " | ".join(tables.TABLES[name].columns) + " |": name
        for name in tables.TABLES
    }
    return [
        f"{where}: table {headers[line.strip()]} written by hand, outside markers"
        for line in outside.splitlines()
        if line.strip() in headers
    ]


PAGES = [p for p in tables.pages() if p.exists()]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_figures_are_the_result_files(path):
    text = path.read_text()
    where = str(path.relative_to(ROOT))
    problems = mismatches(text, tables.RESULTS, where) + _unmarked_tables(text, where)
    assert not problems, "\n".join(problems) + "\n(python benchmarks/tables.py)"


def test_every_result_file_is_shown():
    shown = {
        match.group("name")
        for path in PAGES
        for match in tables.BLOCK.finditer(path.read_text())
    }
    assert shown == set(tables.TABLES)


def test_a_changed_result_is_reported(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(tables.RESULTS, results)
    rows = json.loads((results / "model_parallel.json").read_text())
    rows[1]["over_single"] = 9.99
    (results / "model_parallel.json").write_text(json.dumps(rows))
    text = "<!-- table: model_parallel -->\n" + tables.render(
        "model_parallel", tables.RESULTS
    )
    text += "<!-- /table -->\n"
    assert mismatches(text, tables.RESULTS, "page") == []
    found = mismatches(text, results, "page")
    assert len(found) == 1 and "'9.99'" in found[0], found


def test_a_hand_edited_cell_and_a_hand_copied_table_are_reported():
    body = tables.render("sharding")
    edited = body.replace("| 1.00 |", "| 1.01 |", 1)
    assert edited != body
    text = "<!-- table: sharding -->\n" + edited + "<!-- /table -->\n"
    found = mismatches(text, tables.RESULTS, "page")
    assert len(found) == 1 and "'1.01'" in found[0], found
    assert len(_unmarked_tables(body, "page")) == 1
