"""Every committed study that carries its results (`reports/<study>/results/`, written by
`python -m grid publish`) rebuilds its table3.md and report.json byte for byte with the command
its README gives, so any claim in it can be re-checked from what is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

STUDIES = sorted(p.parent.parent.relative_to(ROOT / "reports").as_posix()
                 for p in (ROOT / "reports").rglob("results/cells"))


def test_some_study_carries_its_results():
    assert STUDIES, "no reports/<study>/results/ committed"


@pytest.mark.parametrize("study", STUDIES)
def test_the_report_rebuilds_byte_for_byte(study, tmp_path):
    folder = Path("reports") / study
    proc = run_cli("-m", "grid", "report", str(folder / "results"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for name in ("table3.md", "report.json"):
        assert (tmp_path / name).read_bytes() == (ROOT / folder / name).read_bytes(), f"{study}/{name} differs"
    size = sum(p.stat().st_size for p in (ROOT / folder / "results").rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"{study}'s results hold {size / 2**20:.1f} MB"
