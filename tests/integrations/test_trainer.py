"""qft inside transformers' Trainer: a PEFT LoRA model over qft layers, PagedAdamW8bit, gradient
checkpointing, checkpoint save and resume (CPU)."""

import copy

import pytest
import torch
from llama_models import VOCAB, tiny_llama_config

import qft

pytest.importorskip("peft")
pytest.importorskip("accelerate")
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from qft.integrations import peft as qft_peft
from qft.optim import PagedAdamW8bit

STEPS = 30


class _Counting(torch.utils.data.Dataset):
    """Sequences counting up from a random start (next token = this token + 1): learnable in a few
    dozen steps by adapters on a random base."""

    def __init__(self, n=64, length=16):
        starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    return qft.quantize_(model, filter_fn=lambda module, name: name != "lm_head")


def _trainer(base, out, max_steps, save_steps=STEPS // 2, **overrides):
    torch.manual_seed(0)  # LoRA A's initialization draws from the global generator
    model = get_peft_model(
        copy.deepcopy(base),
        qft_peft.register(
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            )
        ),
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=save_steps,
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **overrides,
    )
    losses = _Losses()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Counting(),
        callbacks=[losses],
        optimizer_cls_and_kwargs=(PagedAdamW8bit, {"lr": 2e-2}),
    )
    return trainer, losses


def test_trainer_trains_and_resumes_on_the_same_curve(base, tmp_path):
    trainer, full = _trainer(base, tmp_path / "full", STEPS)
    trainer.train()
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, PagedAdamW8bit
    )
    first = sum(full.losses[s] for s in range(1, 6)) / 5
    last = sum(full.losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.1, f"mean loss of the first / last five steps: {first:.3f} -> {last:.3f}"
    # A second run stops at the mid checkpoint, a third resumes from it: the same losses as the first.
    half, _ = _trainer(base, tmp_path / "half", STEPS // 2)
    half.train()
    resumed, after = _trainer(base, tmp_path / "half", STEPS)
    resumed.train(resume_from_checkpoint=str(tmp_path / "half" / f"checkpoint-{STEPS // 2}"))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert after.losses[step] == full.losses[step], step  # bit-identical: state and RNG resume exactly
    # Resumed twice in a row (a checkpoint written by a resumed run, loaded again): the same curve. The
    # second load used to be refused (8-bit state cast to fp32 by torch's load_state_dict).
    third = STEPS // 3
    _trainer(base, tmp_path / "chain", third, save_steps=third)[0].train()
    middle, _ = _trainer(base, tmp_path / "chain", 2 * third, save_steps=third)
    middle.train(resume_from_checkpoint=str(tmp_path / "chain" / f"checkpoint-{third}"))
    last, tail = _trainer(base, tmp_path / "chain", STEPS, save_steps=third)
    last.train(resume_from_checkpoint=str(tmp_path / "chain" / f"checkpoint-{2 * third}"))
    for step in range(2 * third + 1, STEPS + 1):
        assert tail.losses[step] == full.losses[step], step


def test_trainer_with_bf16_autocast_trains(base, tmp_path):
    # bf16=True on CPU runs the model under torch.autocast("cpu", bfloat16): it failed at step 1.
    trainer, losses = _trainer(base, tmp_path / "bf16", 6, save_steps=100, bf16=True)
    trainer.train()
    assert len(losses.losses) == 6 and all(torch.isfinite(torch.tensor(v)) for v in losses.losses.values())
    assert losses.losses[6] < losses.losses[1]
