"""The quant benchmark runs on CPU and writes its rows (timings themselves are not asserted)."""

import json
import sys
from pathlib import Path

import pytest

from qft import formats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quant

RATES = {"copy_bandwidth_gbps": 10.0, "matmul_tflops": 0.1}  # floors only; not measured in tests


PATHS = ("", " gemv", " fused")  # bench_lowbit.PATHS: the dispatcher's choice, then each small-M kernel


def test_bench_quant_writes_rows_side_by_side(tmp_path, capsys):
    assert bench_quant.main(["--device", "cpu", "--shape", "64x256", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("quant-*.json")
    data = json.loads(result.read_text())
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {"qft-cpu", "qft-reference", "bitsandbytes"}
    assert {r["op"] for r in rows} == {"quantize nf4+dq", "dequantize nf4+dq"}
    assert all(r["p50_ms"] > 0 and r["gbps"] > 0 for r in rows)
    decodes = [r["matches_bitsandbytes"] for r in rows if r["provider"].startswith("qft-") and "dequant" in r["op"]]
    assert decodes == [True, True]
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
    from qft.cli import bench

    assert bench.run(None, "cpu", True, str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "not GPU kernel results" in printed and "TFLOP/s (measured)" in printed
    expected = {
        "quant": {"qft-cpu", "qft-reference", "bitsandbytes"},
        "linear": {"qft", "peft-bf16", "peft-bnb", "qft-oft", "peft-oft-bnb"},
        "lowbit": {"bf16 torch", "bitsandbytes nf4", *(f"qft {f}{p}" for f in formats.FORMATS for p in PATHS)},
        "e2e": {"qft", "qft-fused", "peft-bf16", "peft-bnb"},
        "adapters": {
            "qft-lora",
            "qft-oft",
            "qft-boft",
            "qft-diablo",
            "qft-ether",
            "qft-hra",
            "peft-boft-bnb",
            "peft-hra-bf16",
        },
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
            assert "error" not in row, row
            assert {"suite", "op", "provider", "shape", "dtype", "device", "p50_ms", "p20_ms", "p80_ms"} <= set(row)
            assert row["suite"] == suite and row["p50_ms"] > 0
        (csv_file,) = tmp_path.glob(f"{suite}-*.csv")
        assert csv_file.read_text().splitlines()[0].startswith("suite,op,provider")
        (jsonl,) = tmp_path.glob(f"{suite}-*.jsonl")  # appended as measured: the same rows
        streamed = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert [(r["op"], r["provider"]) for r in streamed] == [(r["op"], r["provider"]) for r in rows]
    assert len(list(tmp_path.glob("linear-*.png"))) == 1


def test_failing_provider_leaves_an_error_row_and_the_rest(tmp_path, monkeypatch):
    import bench_linear

    real_build = bench_linear.build

    def build(provider, dense, device):
        if provider == "peft-bf16":
            raise RuntimeError("planted failure")
        return real_build(provider, dense, device)

    monkeypatch.setattr(bench_linear, "build", build)
    rows, _, paths = bench_linear.run_suite("cpu", True, tmp_path, RATES, repeats=1)
    errors = [r for r in rows if "error" in r]
    assert [(r["provider"], r["op"], r["error"]) for r in errors] == [
        ("peft-bf16", "build", "RuntimeError: planted failure")
    ] * 2  # both quick cases
    timed = {r["provider"] for r in rows if "error" not in r}
    assert timed == {"qft", "peft-bnb", "qft-oft", "peft-oft-bnb"}
    assert all(r["vs_peft_bf16"] is None and r["vs_peft_bnb"] > 0 for r in rows if "error" not in r)
    assert "planted failure" in paths[2].read_text()  # the markdown table has an error column
    assert "planted failure" in next(tmp_path.glob("linear-*.jsonl")).read_text()


def test_failing_measurement_keeps_the_other_ops(tmp_path, monkeypatch):
    import bench_lowbit
    import common

    real = common.time_ms

    def time_ms(fn, device, repeats, graph=False):
        if getattr(fn, "__name__", "") == "dequantize":
            raise ValueError("planted decode failure")
        return real(fn, device, repeats, graph)

    monkeypatch.setattr(common, "time_ms", time_ms)
    monkeypatch.setenv("QFT_BENCH_FORMATS", "nf4,int2")
    rows, _, _ = bench_lowbit.run_suite("cpu", True, tmp_path, RATES, repeats=1)
    errors = {(r["provider"], r["op"]) for r in rows if "error" in r}
    assert errors == {("qft nf4", "dequantize"), ("qft int2", "dequantize")}
    forwards = {r["provider"] for r in rows if r["op"] == "fwd M=1" and "error" not in r}
    assert forwards == {"bf16 torch", "bitsandbytes nf4", *(f"qft {f}{p}" for f in ("nf4", "int2") for p in PATHS)}


def test_filters_select_providers_shapes_and_ms(tmp_path, monkeypatch):
    import bench_linear

    for kind in ("PROVIDERS", "SHAPES", "MS"):
        monkeypatch.setenv(f"QFT_BENCH_{kind}", "")  # main() sets them; monkeypatch restores them after

    argv = ["--device", "cpu", "--repeats", "1", "--out", str(tmp_path), "--providers", "qft,peft-bnb"]
    assert bench_linear.main([*argv, "--shapes", "1024x256", "--ms", "16"]) == 0
    rows = json.loads(next(tmp_path.glob("linear-*.json")).read_text())["rows"]
    assert {(r["provider"], r["shape"]) for r in rows} == {("qft", "16x1024x256"), ("peft-bnb", "16x1024x256")}


def test_harness_rejects_unknown_suite():
    from qft.cli import bench

    with pytest.raises(bench.BenchError, match="--suite must be among"):
        bench.run(["fast"], "cpu", True, None)


def test_optim_host_bench_appends_labelled_rows(tmp_path):
    import optim_host

    for label in ("before", "after"):
        assert optim_host.main(["--layers", "1", "--repeats", "2", "--label", label, "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in next(tmp_path.glob("optim-host-*.jsonl")).read_text().splitlines()]
    assert [(r["code"], r["provider"]) for r in rows] == [
        (label, f"qft {name}") for label in ("before", "after") for name in ("PagedAdamW", "PagedAdamW8bit")
    ]
    assert all(r["tensors"] == 14 and r["host_ms"] > 0 for r in rows)
    assert next(tmp_path.glob("optim-host-*.md")).read_text().count("| after |") == 2


def test_lora_gemm_bench_counts_what_each_arrangement_creates(tmp_path, monkeypatch):
    import bench_lora_gemm

    monkeypatch.setitem(bench_lora_gemm.SHAPES, "cpu", [(64, 128, 96, 8)])
    rows = {r["provider"]: r for r in bench_lora_gemm.run("cpu", tmp_path)}
    before, fused = rows["before (M x N epilogue)"], rows["fused (K + r GEMMs)"]
    assert fused["m_by_n_extra"] == 0 < before["m_by_n_extra"]
    assert fused["created_mb"] < before["created_mb"] and fused["p50_ms"] > 0
    assert len(list(tmp_path.glob("lora_gemm-*.md"))) == 1


def test_side_by_side_timing_samples_providers_in_turns_and_keeps_failures_apart():
    import common

    order = []
    fns = {
        "a": lambda: order.append("a"),
        "b": lambda: order.append("b"),
        "broken": lambda: 1 / 0,
    }
    timings = common.time_side_by_side(fns, "cpu", repeats=1)
    assert isinstance(timings["broken"], ZeroDivisionError)
    assert all(len(timings[k]) == 3 and 0 < timings[k][0] for k in ("a", "b"))
    # after the two warm-up calls each, samples alternate: a run of a's, then of b's, round after round
    runs = [key for i, key in enumerate(order[4:]) if i == 0 or order[4 + i - 1] != key]
    assert runs == ["a", "b"] * common.CPU_MIN_SAMPLES
