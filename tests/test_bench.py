"""The quant benchmark runs on CPU and writes its rows (timings themselves are not asserted)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quant


def test_bench_quant_writes_rows_side_by_side(tmp_path, capsys):
    assert bench_quant.main(["--device", "cpu", "--shape", "64x256", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("quant-*.json")
    data = json.loads(result.read_text())
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {"qft-reference", "bitsandbytes"}
    assert {r["op"] for r in rows} == {"quantize nf4+dq", "dequantize nf4+dq"}
    assert all(r["p50_ms"] > 0 and r["gbps"] > 0 for r in rows)
    assert [r["matches_bitsandbytes"] for r in rows if r["provider"] == "qft-reference" and "dequant" in r["op"]] == [
        True
    ]
    assert data["meta"]["copy_bandwidth_gbps"] > 0
    assert len(list(tmp_path.glob("quant-*.csv"))) == 1 and len(list(tmp_path.glob("quant-*.md"))) == 1
    assert "not GPU kernel results" in capsys.readouterr().err


def test_bench_quant_rejects_bad_shape():
    with pytest.raises(SystemExit):
        bench_quant.main(["--device", "cpu", "--shape", "64by256"])


def test_bench_linear_runs_every_provider_on_cpu(tmp_path):
    import bench_linear

    assert bench_linear.main(["--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("linear-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"qft", "peft-bf16", "peft-bnb", "qft-oft", "peft-oft-bnb"}
    assert {r["op"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["p50_ms"] > 0 and r["vs_peft_bnb"] > 0 for r in rows)


def test_harness_quick_writes_every_suite_with_every_provider(tmp_path, capsys):
    from qft import bench

    assert bench.run(None, "cpu", True, str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "not GPU kernel results" in printed and "TFLOP/s (measured)" in printed
    expected = {
        "quant": {"qft-reference", "bitsandbytes"},
        "linear": {"qft", "peft-bf16", "peft-bnb", "qft-oft", "peft-oft-bnb"},
        "lowbit": {"bf16 torch", *(f"qft {f}" for f in ("nf4", "lloyd3", "int3", "lloyd2", "int2"))},
        "e2e": {"qft", "peft-bf16", "peft-bnb"},
        "optim": {
            "torch AdamW",
            "qft PagedAdamW",
            "qft PagedAdamW8bit",
            "qft AdamW8bit",
            "bnb PagedAdamW",
            "bnb PagedAdamW8bit",
        },
    }
    for suite, providers in expected.items():
        (json_file,) = tmp_path.glob(f"{suite}-*.json")
        data = json.loads(json_file.read_text())
        assert {"copy_bandwidth_gbps", "matmul_tflops", "versions", "device_name"} <= set(data["meta"])
        rows = data["rows"]
        assert {r["provider"] for r in rows} == providers
        for row in rows:
            assert {"suite", "op", "provider", "shape", "dtype", "device", "p50_ms", "p20_ms", "p80_ms"} <= set(row)
            assert row["suite"] == suite and row["p50_ms"] > 0
        (csv_file,) = tmp_path.glob(f"{suite}-*.csv")
        assert csv_file.read_text().splitlines()[0].startswith("suite,op,provider")
    assert len(list(tmp_path.glob("linear-*.png"))) == 1


def test_harness_rejects_unknown_suite():
    from qft import bench

    with pytest.raises(bench.BenchError, match="--suite must be among"):
        bench.run(["fast"], "cpu", True, None)
