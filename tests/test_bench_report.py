"""The bench report's own arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
from bench import report


def _run(path: str, rep: int, cpu: float | None, scenario: str = "c64") -> dict[str, Any]:
    return {"path": path, "scenario": scenario, "rep": rep, "summary": {"cpu_ms_per_req": cpu}}


def test_a_paired_ratio_divides_within_each_repetition() -> None:
    # Within each repetition A costs 1%, 2% and 9% more than B while the machine drifts.
    runs = [
        *(_run("A", rep, cpu) for rep, cpu in enumerate([0.202, 0.306, 0.218])),
        *(_run("B", rep, cpu) for rep, cpu in enumerate([0.200, 0.300, 0.200])),
        _run("B", 3, 0.5),  # a repetition with one side only is not a pair
        _run("A", 0, 9.0, scenario="c1"),  # nor is another scenario
    ]
    assert report.paired_ratio(runs, "A", "B", "c64", "cpu_ms_per_req") == pytest.approx(1.02)


def test_a_paired_ratio_skips_missing_figures() -> None:
    runs = [_run("A", 0, None), _run("B", 0, 0.2), _run("A", 1, 0.33), _run("B", 1, 0.3)]
    assert report.paired_ratio(runs, "A", "B", "c64", "cpu_ms_per_req") == pytest.approx(1.1)
    assert report.paired_ratio(runs[:2], "A", "B", "c64", "cpu_ms_per_req") is None
