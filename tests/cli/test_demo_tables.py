"""The README's demo tables (benchmarks/demo_calibrated.py, demo_adapters.py): every run kept as it
finishes, a rerun doing only what is missing, the result files written from all of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import common
import demo_calibrated

from qft.cli import demo


def test_a_rerun_does_only_the_missing_runs_and_writes_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    seen = []

    def fake_run(config):
        seen.append(config)
        return {"format": config.format, "held-out cosine before": 0.5, "held-out cosine after": 0.9}

    monkeypatch.setattr(demo, "run", fake_run)
    args = ["--steps", "3", "--formats", "nf4,int2", "--methods", "icq,icq+gptq+apiq,2.5-bit plan"]
    assert demo_calibrated.main(args) == 0
    # icq on both formats; the ICQ-variant combination only where a variant exists (nf4); the plan once
    assert [(c.format, c.quant_method, c.bits_budget) for c in seen] == [
        ("nf4", "icq", None),
        ("nf4_icq", "gptq", None),
        ("int2", "icq", None),
        ("nf4", "hqq", 2.5),
    ]
    assert all(c.steps == 3 and not c.progress for c in seen)
    assert demo_calibrated.main(args) == 0 and len(seen) == 4  # nothing left to run
    (log,) = tmp_path.glob("demo_calibrated-*.jsonl")
    assert [json.loads(line)["method"] for line in log.read_text().splitlines()] == [
        "icq",
        "icq+gptq+apiq",
        "icq",
        "2.5-bit plan",
    ]
    (written,) = tmp_path.glob("demo_calibrated-*.json")
    assert len(json.loads(written.read_text())["rows"]) == 4
