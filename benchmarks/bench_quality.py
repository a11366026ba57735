"""Low-bit quality table: relative Frobenius error ||W - W_hat|| / ||W|| and bits/param (metadata
included) for every qft format against min-max round-to-nearest, HQQ (default and a slow solver)
and QLoRA-style NF3/NF2, on N(0,1) and Student-t(4) 4096x4096 matrices and the real MiniLM-L6
weights of the demo model; and on MiniLM's real activations, each layer's output error
||X (W - W_hat)^T|| / ||X W^T|| over held-out sentences, with qft's GPTQ (calibrated on training
sentences), ICQ and ApiQ's starting point (quantized weight plus initial LoRA r16 term) beside the
uncalibrated methods. One run writes ``benchmarks/results/quality-<date>.{md,json}``.

    python benchmarks/bench_quality.py [--size 4096] [--out DIR] [--outputs-only]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path

import common
import torch

import qft
from qft import formats
from qft.adapters.lora.apiq import apiq

GROUP = 64
QFT_FORMATS = ["nf4", "int4", "lloyd3", "nf3", "int3", "lloyd2", "nf2", "int2"]


def _rel(w_hat: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    return float(((w_hat.float() - w) ** 2).sum()), float((w**2).sum())


def qft_method(fmt: str):
    """qft's own quantizer for ``fmt`` (double-quantized scales): (W_hat, bits/param)."""

    def run(w):
        qt = qft.quantize(w, fmt, GROUP, double_quant=True)
        return qt.dequantize(torch.float32), qt.bits_per_param

    return run


def rtn_min_max(bits: int):
    """Asymmetric min-max round-to-nearest, fp16 scale and zero per group (+0.5 bits)."""

    def run(w):
        weight = formats.quantize(w, f"int{bits}", GROUP, "rtn")
        return formats.dequantize(weight, torch.float32).view_as(w), bits + 0.5

    return run


def hqq_method(bits: int, slow: bool):
    """The hqq package (axis 1, group 64, fp16 scale and zero: +0.5 bits); slow = its v2 solver run
    for 100 iterations without early stopping (its scale grid search fails for axis 1 in 0.2.8)."""

    def run(w):
        from hqq.core import optimize
        from hqq.core.quantize import Quantizer

        saved = Quantizer.optimize_weights
        if slow:
            params = {
                "lp_norm": 0.7,
                "beta": 1e1,
                "kappa": 1.01,
                "iters": 100,
                "tol": 0.0,
                "early_stop": False,
                "scale_gridsearch": False,
            }
            Quantizer.optimize_weights = functools.partial(optimize.optimize_weights_proximal_v2, opt_params=params)
        try:
            wq, meta = Quantizer.quantize(
                w, nbits=bits, group_size=GROUP, axis=1, device="cpu", compute_dtype=torch.float32
            )
        finally:
            Quantizer.optimize_weights = saved
        return Quantizer.dequantize(wq, meta).reshape(w.shape).float(), bits + 0.5

    return run


@functools.cache
def qlora_nf_table(bits: int) -> torch.Tensor:
    """QLoRA's NF-k construction (bitsandbytes' create_normal_map generalized to k bits)."""
    from scipy.stats import norm

    offset, half = 0.9677083, 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float32)
    return values / values.abs().max()


def qlora_nf(bits: int):
    """NF-k with block-64 absmax (fp32 absmax double-quantized: +0.127 bits), nearest code."""

    def run(w):
        table = qlora_nf_table(bits)
        blocks = w.reshape(-1, GROUP)
        absmax = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38)
        idx = torch.bucketize(blocks / absmax, (table[1:] + table[:-1]) / 2)
        return (table[idx] * absmax).view_as(w), bits + 8 / GROUP + 32 / (GROUP * 256)

    return run


def methods() -> dict[str, tuple[int, object]]:
    """Every (name -> (bits, quantizer)) compared."""
    out = {f"qft {f}": (qft.formats.get_format(f).bits, qft_method(f)) for f in QFT_FORMATS}
    for bits in (4, 3, 2):
        out[f"min-max RTN {bits}b"] = (bits, rtn_min_max(bits))
        out[f"HQQ default {bits}b"] = (bits, hqq_method(bits, slow=False))
        out[f"HQQ slow {bits}b"] = (bits, hqq_method(bits, slow=True))
    out["QLoRA NF3"] = (3, qlora_nf(3))
    out["QLoRA NF2"] = (2, qlora_nf(2))
    return out


def matrices(size: int) -> dict[str, list[torch.Tensor]]:
    """The test weights: synthetic N(0,1) and Student-t(4), and MiniLM-L6's linear weights."""
    g = torch.Generator().manual_seed(0)
    found = {
        f"N(0,1) {size}x{size}": [torch.randn(size, size, generator=g)],
        f"Student-t(4) {size}x{size}": [torch.distributions.StudentT(4.0).sample((size, size))],
    }
    try:
        from qft.cli.demo import default_model_path, load_model

        _, model = load_model(default_model_path(), torch.device("cpu"))
        found["MiniLM-L6 linears"] = [
            m.weight.detach().float() for m in model.modules() if isinstance(m, torch.nn.Linear)
        ]
    except Exception as exc:  # the synthetic rows still stand without the demo model
        print(f"MiniLM weights unavailable: {exc}", file=sys.stderr)
    return found


CALIBRATED_FORMATS = ["nf4", "int4", "lloyd3", "int3", "lloyd2", "int2"]


def minilm_statistics():
    """(linear weights by name, X^T X / n on training sentences, the same on held-out sentences) of the
    demo model: the demo's own split and batching (8 batches of 16 training sentences)."""
    import random

    from qft.cli import demo

    config = demo.DemoConfig()
    tokenizer, model = demo.load_model(demo.default_model_path(), torch.device("cpu"))
    train, held_out = demo.load_sentences(config.seed)
    batches = list(demo.sentence_batches(tokenizer, random.Random(1).sample(train, 128), 16, config.max_length, "cpu"))
    evaluation = list(demo.sentence_batches(tokenizer, held_out, 64, config.max_length, "cpu"))
    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    return weights, qft.calibrate(model, batches), qft.calibrate(model, evaluation)


def calibrated_methods(calibration) -> dict[str, tuple[int, object]]:
    """name -> (bits, quantizer(name, w)): qft's formats plain and with GPTQ (and act-order), and the peers."""

    def qft_run(fmt, method, act_order=False):
        def run(name, w):
            hessian = calibration[name] if method == "gptq" else None
            qt = qft.quantize(w, fmt, GROUP, True, method, hessian, act_order)
            return qt.dequantize(torch.float32), qt.bits_per_param

        return run

    def apiq_start(fmt):  # ApiQ's quantized weight plus its initial LoRA r16 term, as training starts
        quant = qft.QuantConfig(fmt, GROUP, method="gptq", act_order=True)
        lora = qft.LoRAConfig(r=16, alpha=32, target_modules=("layer",))

        def run(name, w):
            qt, a, b = apiq(w, calibration[name], quant, lora)
            return qt.dequantize(torch.float32) + lora.scaling * (b @ a), qt.bits_per_param

        return run

    out = {}
    for fmt in CALIBRATED_FORMATS:
        bits = qft.formats.get_format(fmt).bits
        out[f"qft {fmt}"] = (bits, qft_run(fmt, "hqq"))
        out[f"qft {fmt} icq"] = (bits, qft_run(fmt, "icq"))
        out[f"qft {fmt} gptq"] = (bits, qft_run(fmt, "gptq"))
        out[f"qft {fmt} gptq act-order"] = (bits, qft_run(fmt, "gptq", True))
        if f"{fmt}_icq" in qft.formats.FORMATS:
            out[f"qft {fmt}_icq gptq act-order"] = (bits, qft_run(f"{fmt}_icq", "gptq", True))
        out[f"qft {fmt} gptq act-order + apiq r16 start"] = (bits, apiq_start(fmt))
    for bits in (4, 3, 2):
        for name, method in (
            (f"min-max RTN {bits}b", rtn_min_max(bits)),
            (f"HQQ default {bits}b", hqq_method(bits, False)),
        ):
            out[name] = (bits, lambda _, w, method=method: method(w))
    return out


def output_error_rows() -> list[dict]:
    """Weight and held-out output error of every calibrated method over MiniLM's linears."""
    try:
        weights, calibration, evaluation = minilm_statistics()
    except Exception as exc:  # the other tables still stand without the demo model
        print(f"MiniLM activations unavailable: {exc}", file=sys.stderr)
        return []
    rows = []
    for method_name, (bits, method) in calibrated_methods(calibration).items():
        err = total = out_err = out_total = 0.0
        for name, w in weights.items():
            w_hat, bpp = method(name, w)
            e, t = _rel(w_hat, w)
            d, h = (w_hat.float() - w).double(), evaluation[name].double()
            err, total = err + e, total + t
            out_err += float((d @ h * d).sum())  # ||X D^T||^2 / n = tr(D H D^T)
            out_total += float((w.double() @ h * w.double()).sum())
        rows.append(
            {
                "data": "MiniLM-L6 layer outputs (held-out)",
                "method": method_name,
                "bits": bits,
                "bits_per_param": bpp,
                "rel_error": (err / total) ** 0.5,
                "output_error": (out_err / out_total) ** 0.5,
            }
        )
        print(f"{method_name:28s} {bpp:6.3f} {rows[-1]['rel_error']:.4f} {rows[-1]['output_error']:.4f}", flush=True)
    return rows


def run_suite(size: int, out: Path, outputs_only: bool = False) -> tuple[list[dict], Path]:
    """Measure every method on every matrix set (``outputs_only``: only MiniLM's layer outputs, written
    as ``quality-outputs-<date>``); write the md and JSON files."""
    torch.manual_seed(0)
    rows = []
    for data_name, weights in {} if outputs_only else matrices(size).items():
        for name, (bits, method) in methods().items():
            err = total = 0.0
            bpp = 0.0
            for w in weights:
                w_hat, bpp = method(w)
                e, t = _rel(w_hat, w)
                err, total = err + e, total + t
            rows.append(
                {
                    "data": data_name,
                    "method": name,
                    "bits": bits,
                    "bits_per_param": bpp,
                    "rel_error": (err / total) ** 0.5,
                }
            )
            print(f"{data_name:24s} {name:20s} {bpp:6.3f} {rows[-1]['rel_error']:.4f}", flush=True)
    rows += output_error_rows()
    for row in rows:
        peer = [r for r in rows if r["data"] == row["data"] and r["method"] == f"HQQ default {row['bits']}b"]
        row["vs_hqq_default"] = row["rel_error"] / peer[0]["rel_error"] if peer else None
        if "output_error" in row and peer:
            row["output_vs_hqq_default"] = row["output_error"] / peer[0]["output_error"]
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality-{'outputs-' if outputs_only else ''}{datetime.date.today().isoformat()}"
    meta = {"group": GROUP, "versions": common.versions(), "size": size}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta) + "\n")
    return rows, stem.with_suffix(".md")


def markdown(rows: list[dict], meta: dict) -> str:
    """One table per data set: method, bits, bits/param, error, ratio to HQQ's default at equal bits."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [f"Relative Frobenius error, group/block {meta['group']} ({versions}).", ""]
    for data in dict.fromkeys(r["data"] for r in rows):
        outputs = any("output_error" in r for r in rows if r["data"] == data)
        extra = " output error | vs HQQ default |" if outputs else ""
        lines += [
            f"### {data}",
            "",
            "| method | bits | bits/param | rel. error | vs HQQ default |" + extra,
            "|---|---|---|---|---|" + ("---|---|" if outputs else ""),
        ]
        key = (lambda r: (-r["bits"], r["output_error"])) if outputs else (lambda r: (-r["bits"], r["rel_error"]))
        for r in sorted((r for r in rows if r["data"] == data), key=key):
            ratio = f"{r['vs_hqq_default']:.3f}" if r["vs_hqq_default"] else ""
            line = f"| {r['method']} | {r['bits']} | {r['bits_per_param']:.3f} | {r['rel_error']:.4f} | {ratio} |"
            if outputs:
                out_ratio = f"{r['output_vs_hqq_default']:.3f}" if r.get("output_vs_hqq_default") else ""
                line += f" {r['output_error']:.4f} | {out_ratio} |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the quality comparison and print the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="synthetic matrices are size x size")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--outputs-only", action="store_true", help="only MiniLM's layer-output table")
    args = parser.parse_args(argv)
    _, path = run_suite(args.size, args.out, args.outputs_only)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
