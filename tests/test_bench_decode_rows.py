"""scripts/bench_decode_rows.py on the debug preset: it times every row count it is asked for
and fits the per-step cost line (the timings themselves are not asserted: shared CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_decode_rows_benchmark_prints_each_row_count_and_the_fit():
    cmd = [sys.executable, "scripts/bench_decode_rows.py", "--rows", "1", "2", "4"]
    cmd += ["--context", "0", "3", "--steps", "2", "--repeats", "1", "debug=fast"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "| generated context | 1 rows | 2 rows | 4 rows | a (ms) | b (ms/row) |" in out
    for context in (0, 3):
        line = next(row for row in out.splitlines() if row.startswith(f"| {context} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 1 + 3 + 2
        ratios = [float(re.search(r"\(([\d.]+)\)", c).group(1)) for c in cells[1:4]]
        assert ratios[-1] == 1.0  # each count against the largest
