"""The demo end to end (few steps), and its one-line errors."""

import subprocess
import sys

import pytest

from qft.cli import demo


def test_demo_improves_held_out_cosine(tmp_path):
    config = demo.DemoConfig(steps=20, out=str(tmp_path / "adapter"), progress=False)
    result = demo.run(config)
    assert result["held-out cosine after"] > result["held-out cosine before"] + 0.002
    assert result["linear weights bits/param before"] == 32.0
    assert 4.1 < result["linear weights bits/param after"] < 4.2
    assert result["model MB after (with adapters)"] < result["model MB before"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "held-out cosine after" in demo.report(result)


def test_demo_trains_oft_adapters_at_two_bits(tmp_path):
    config = demo.DemoConfig(format="int2", adapter="oft", steps=15, out=str(tmp_path / "oft"), progress=False)
    result = demo.run(config)
    assert result["held-out cosine after"] > result["held-out cosine before"] + 0.01
    assert (tmp_path / "oft" / "adapter_config.json").read_text().count('"OFT"') == 1


def test_gptq_calibrated_on_training_batches_starts_nearer_the_teacher(tmp_path, monkeypatch):
    seen = []
    calibrate = demo.qft.calibrate
    monkeypatch.setattr(demo.qft, "calibrate", lambda model, batches: seen.extend(batches) or calibrate(model, batches))
    results = {}
    for method in ("hqq", "gptq"):
        out = str(tmp_path / method)
        results[method] = demo.run(
            demo.DemoConfig(format="int3", quant_method=method, steps=1, out=out, progress=False)
        )
    assert results["gptq"]["quant method"] == "gptq"
    assert results["gptq"]["held-out cosine before"] > results["hqq"]["held-out cosine before"] + 0.03  # 0.95 vs 0.88
    assert len(seen) == demo.DemoConfig.calibration_batches
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(demo.default_model_path())

    def as_seen(sentence):  # what a sentence is after the demo's tokenizing, decoded
        ids = tokenizer(sentence, truncation=True, max_length=demo.DemoConfig.max_length)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True)

    train, held_out = demo.load_sentences(0)
    texts = {tokenizer.decode(ids, skip_special_tokens=True) for batch in seen for ids in batch["input_ids"]}
    assert texts <= {as_seen(t) for t in train}  # training sentences only
    assert not texts & {as_seen(t) for t in held_out}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("init", ["apiq", "apiq-seq"])
def test_apiq_inits_get_a_lora_apiq_config_and_training_batches(tmp_path, monkeypatch, init):
    """The demo's wiring only (each init is tested in tests/adapters and tests/nn): the call it makes."""
    seen = {}

    def record(name):
        def stop(model, config, quant_config, *rest, **kwargs):
            seen[name] = (config, quant_config, rest, kwargs)
            raise _Stop

        return stop

    monkeypatch.setattr(demo.qft.nn, "apiq_sequential", record("sequential"))
    monkeypatch.setattr(demo.qft, "add_adapters", record("add_adapters"))
    config = demo.DemoConfig(format="int2", init=init, quant_method="gptq", steps=1, out=str(tmp_path), progress=False)
    with pytest.raises(_Stop):
        demo.run(config)
    (name, (lora, quant, rest, kwargs)), *_ = seen.items()
    assert name == ("sequential" if init == "apiq-seq" else "add_adapters")
    assert lora.init == "apiq" and quant.format == "int2" and quant.method == "gptq" and quant.act_order
    if init == "apiq-seq":
        (batches,) = rest
        assert len(batches) == demo.DemoConfig.calibration_batches and "input_ids" in batches[0]
    else:
        assert set(kwargs["calibration"]) >= {n for n, m in lora_targets(demo)}


def lora_targets(demo_module):
    _, model = demo_module.load_model(demo_module.default_model_path(), "cpu")
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent"], "is not a model folder"),
        (["--format", "int9"], "--format must be one of"),
        (["--adapter", "dora"], "--adapter must be 'boft' or 'diablo' or 'ether' or 'hra' or 'lora' or 'oft'"),
        (["--steps", "0"], "--steps must be positive"),
        (["--optim", "sgd"], "--optim must be one of"),
        (["--steps", "many"], "invalid int value"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--batch-size", "100000"], "exceeds the"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--lr", "inf"], "--lr must be a positive finite number"),
        (["--adapter", "oft", "--oft-block-size", "7"], "does not divide"),
        (["--quant-method", "awq"], "--quant-method: method must be"),
        (["--init", "lofty"], "init must be one of"),
        (["--quant-method", "gptq", "--calibration-batches", "0"], "--calibration-batches must be positive"),
        (["--init", "apiq", "--calibration-batches", "0"], "--calibration-batches must be positive"),
        (["--adapter", "oft", "--iec"], "--iec is a LoRA option"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    result = subprocess.run([sys.executable, "-m", "qft", "demo", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # above it at most transformers' loading bar
    assert last.startswith("python -m qft demo: error:") or last.startswith("python -m qft: error:"), last
    assert message in last and "Traceback" not in result.stderr


def test_a_diverging_run_fails_instead_of_reporting(tmp_path):
    config = demo.DemoConfig(steps=5, lr=1e30, out=str(tmp_path / "a"), progress=False)
    with pytest.raises(demo.DemoError, match="training diverged at step"):
        demo.run(config)
    assert not (tmp_path / "a").exists()
