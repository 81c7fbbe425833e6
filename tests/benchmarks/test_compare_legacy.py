"""The committed results of the old harness (benchmarks/results/{gil_v2,headroom}/runs.json), read
through the new report with no re-run, reproduce the numbers of their committed table.md: the main
table and the per-family gold, every cell to the precision it was printed with."""

import json
import os
import re

import pytest

from benchmarks.compare import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = os.path.join(ROOT, "examples", "tasks", "miniature", "task.yaml")
# the old table's column -> the new table's
COLUMNS = {"runs": "runs", "gold eval": "gold eval", "worst family eval": "worst group eval", "gold OOD": "gold OOD",
           "worst family OOD": "worst group OOD", "family gap": "group gap", "proxy − gold": "proxy − gold",
           "RM score": "reward eval", "idk rate (hard)": "hack rate hard", "KL to SFT": "KL to SFT",
           "collapsed": "collapsed"}


def markdown_table(text: str, first_header: str):
    """{row name: {column: cell}} of the first table whose header starts with first_header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def numbers(cell: str):
    """'0.621 ± 0.019' -> [(0.621, 3), (0.019, 3)] (value, decimals printed); '–' -> []."""
    return [(float(x), len(x.split(".")[1]) if "." in x else 0) for x in re.findall(r"[-+]?\d+(?:\.\d+)?", cell)]


def assert_same_numbers(old_cell: str, new_cell: str, where: str):
    old, new = numbers(old_cell), numbers(new_cell)
    assert len(old) == len(new), f"{where}: {old_cell!r} vs {new_cell!r}"
    for (o, dec), (n, _) in zip(old, new):
        assert abs(n - o) <= 0.5 * 10 ** -dec + 1e-9, f"{where}: {old_cell!r} vs {new_cell!r}"


@pytest.mark.parametrize("protocol", ["gil_v2", "headroom"])
def test_legacy_runs_reproduce_the_committed_table(protocol, tmp_path, capsys):
    results = os.path.join(ROOT, "benchmarks", "results", protocol)
    work = tmp_path / protocol
    assert cli.main(["--task", TASK, "--protocol", os.path.join(ROOT, "examples", "tasks", "miniature", "protocols",
                                                                f"{protocol}.yaml"),
                     "--workdir", str(work), "--from-legacy", os.path.join(results, "runs.json")]) == 0
    old_text = open(os.path.join(results, "table.md")).read()
    new_text = (work / "table.md").read_text()
    old, new = markdown_table(old_text, "| arm | runs |"), markdown_table(new_text, "| arm | runs |")
    assert list(new) == list(old)  # the same arms, in the same order
    for arm, row in old.items():
        for old_col, new_col in COLUMNS.items():
            if old_col == "runs" or row[old_col] in ("–",):
                assert new[arm][new_col] == row[old_col], (arm, old_col)
            else:
                assert_same_numbers(row[old_col], new[arm][new_col], f"{arm} / {old_col}")
    old_fam = markdown_table(old_text, "| arm | copy |")
    new_fam = markdown_table(new_text, "| arm | copy (easy) |")
    for arm, row in old_fam.items():
        for fam, cell in row.items():
            if fam != "arm":
                col = next(c for c in new_fam[arm] if c.split(" (")[0] == fam)
                assert_same_numbers(cell, new_fam[arm][col], f"{arm} / {fam}")
    doc = json.loads((work / "table.json").read_text())
    assert doc["command"].startswith("python -m benchmarks.compare") and "--from-legacy" in doc["command"]
    assert doc["git"]["commit"] and doc["protocol"]["path"].endswith(f"{protocol}.yaml")
    assert doc["protocol"]["blob"] and doc["verdict"]
    assert (work / "frontier.png").stat().st_size > 1000


def test_gil_v2_statistics_that_need_samples_are_not_computable(tmp_path):
    work = tmp_path / "w"
    cli.main(["--task", TASK, "--protocol", os.path.join(ROOT, "examples", "tasks", "miniature", "protocols",
                                                         "gil_v2.yaml"), "--workdir", str(work),
              "--from-legacy", os.path.join(ROOT, "benchmarks", "results", "gil_v2", "runs.json")])
    doc = json.loads((work / "table.json").read_text())
    arm = doc["arms"]["gil_kl0.05"]
    assert arm["runs"] == 5 and arm["gold_eval"]["mean"] == pytest.approx(0.558, abs=5e-4)
    assert arm["per_group"]["sort"]["gold_eval"]["mean"] == pytest.approx(0.312, abs=5e-4)
    front = next(c for c in doc["comparisons"] if c["kind"] == "frontier" and c["metric"] == "gold_eval"
                 and c["a"] == "gil")
    assert front["gap"] is not None and front["ci_low"] is None  # a point estimate, no CI without samples
    paired = [c for c in doc["comparisons"] if c["kind"] == "paired"]
    assert paired and all(not c["metrics"] for c in paired)
    assert doc["win_rule"]["held"] is None and doc["verdict"].startswith("UNDECIDED")
    assert "GIL does not win" in (work / "table.md").read_text()  # the old harness' own verdict, quoted
