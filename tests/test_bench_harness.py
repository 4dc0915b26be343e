"""The benchmark harness on tiny sizes, so that `make bench` cannot rot unnoticed.

It runs bench/harness.py end to end (real worker and web subprocesses, PostgreSQL,
SQLite, Redis) with the harness's own Python stand-ins for smtp-sink, smtp-source and
wrk, so `make test` needs no Postfix. The figures are meaningless at this size; the test
only checks that every row of the table comes out with numbers, and the chart too.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["P1", "P1-SQLite", "P2", "P3", "P4", "P5", "P6", "P7", "P8"]


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.mark.timeout(400)
@pytest.mark.slow(60)
def test_harness_produces_every_figure_on_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    chart = tmp_path / "bench-rate.png"
    results = tmp_path / "results.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "harness.py"),
        "--profile", "tiny",
        "--python-tools",
        "--out", str(out),
        "--chart", str(chart),
        "--json", str(results),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    text = out.read_text()
    for fid in FIGURES:
        row = re.search(rf"^\| {fid} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", text, re.M)
        assert row, f"no table row for {fid} in:\n{text[:3000]}"
        assert re.search(r"\d", row.group(2)), f"{fid} has no number: {row.group(0)}"
        assert "(min" in row.group(2) or fid == "P4", f"{fid} states no spread: {row.group(0)}"
    for heading in ("## Machine and versions", "## Settings used", "## Commands"):
        assert heading in text
    assert "MAILER_SMTP_CONNECTIONS=" in text and "MAILER_BATCH_SIZE=" in text

    data = json.loads(results.read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert sorted(rows) == FIGURES
    assert data["errors"] == []
    for fid, row in rows.items():
        numbers = _numbers(row["numbers"])
        assert numbers, f"{fid} carries no numbers"
        assert all(math.isfinite(n) for n in numbers), f"{fid}: {row['numbers']}"
    assert rows["P1"]["numbers"]["mailer_rate"]["median"] > 0
    assert rows["P5"]["numbers"]["sqlite"]["total_s"]["median"] > 0

    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
