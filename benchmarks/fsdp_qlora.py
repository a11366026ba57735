"""QLoRA, QOFT and the other adapter families sharded over N processes with PyTorch FSDP2 (qft.nn.shard_model).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_qlora.py            # 2 CPU ranks (gloo)
    torchrun --standalone --nproc_per_node 8 benchmarks/fsdp_qlora.py --hidden 4096 --layers 32  # GPUs (nccl)
    python benchmarks/fsdp_qlora.py --no-shard                                   # the same run, unsharded

A Llama-style model built from a config (random weights; no download) is quantized with qft, gets
adapters of one family (LoRA, OFT, BOFT, DiaBlo, ETHER, HRA), and trains on fixed token batches: each
rank takes an equal slice of the global batch, FSDP2 averages the gradients, so the losses equal the
unsharded run's (up to fp32 reduction order). ``--cases`` runs several format:adapter[:optimizer bits]
cases in one launch; ``--out`` writes losses, bytes of quantized weights per rank, a checkpoint check
and the final adapter weights (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import qft
from qft.optim import PagedAdamW

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # each family's config for this model (the ``adapter`` of a case)
    "lora": lambda: qft.LoRAConfig(r=8, alpha=16, target_modules=TARGETS),
    "oft": lambda: qft.OFTConfig(block_size=16, target_modules=TARGETS),
    "boft": lambda: qft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS),
    "diablo": lambda: qft.DiaBloConfig(blocks=8, target_modules=TARGETS),
    "ether": lambda: qft.ETHERConfig(blocks=8, plus=True, output_side=True, target_modules=TARGETS),
    "hra": lambda: qft.HRAConfig(r=4, target_modules=TARGETS),
}


def build(fmt: str, adapter: str, args) -> torch.nn.Module:
    """The quantized model with fresh adapters; identical on every rank and in the unsharded run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    qft.quantize_(model, qft.QuantConfig(fmt), filter_fn=lambda module, name: name != "lm_head")
    torch.manual_seed(1)
    qft.add_adapters(model, ADAPTERS[adapter]())  # leaves only the adapters' parts trainable
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def batches(args, world: int, rank: int):
    """This rank's slice of each step's global batch (fixed tokens)."""
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, args.vocab, (args.steps + 1, args.batch, args.seq), generator=g)
    per_rank = args.batch // world
    return data[:, rank * per_rank : (rank + 1) * per_rank]


def optimizer(model, args, bits: int):
    # min_8bit_size 512: the 8-bit tensors here split into whole 256-value blocks on 2 ranks.
    params = [p for p in model.parameters() if p.requires_grad]
    return PagedAdamW(params, lr=args.lr, optim_bits=bits, paged=False, min_8bit_size=512)


def step(model, opt, ids, world: int) -> float:
    """One step; returns the loss averaged over ranks."""
    ids = ids.to("cuda" if torch.cuda.is_available() else "cpu")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def full_adapters(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole (gathered from the shards; a collective under FSDP2)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def checkpoint_round_trip(model, opt, fmt, adapter, bits, args, world, rank, ids) -> bool:
    """Save the sharded model (torch.distributed.checkpoint) and each rank's optimizer shard, load both
    into a fresh sharded model, and check one more step gives the same loss."""
    import torch.distributed.checkpoint as dcp

    folder = Path(args.checkpoint_dir) / f"{fmt}-{adapter}"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder))
    torch.save(opt.state_dict(), folder / f"optim-rank{rank}.pt")
    fresh = build(fmt, adapter, args)
    if world > 1 or not args.no_shard:
        qft.nn.shard_model(fresh)
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=str(folder))
    fresh.load_state_dict(state["model"])
    fresh_opt = optimizer(fresh, args, bits)
    fresh_opt.load_state_dict(torch.load(folder / f"optim-rank{rank}.pt", weights_only=True))
    return step(model, opt, ids, world) == step(fresh, fresh_opt, ids, world)


def run_case(fmt: str, adapter: str, bits: int, args, world: int, rank: int) -> dict:
    model = build(fmt, adapter, args)
    if not args.no_shard:
        qft.nn.shard_model(model)
    local, total = qft.nn.quantized_bytes(model)
    opt = optimizer(model, args, bits)
    data = batches(args, world, rank)
    losses = [step(model, opt, data[i], world) for i in range(args.steps)]
    adapters = full_adapters(model)
    local_bytes = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    if world > 1:
        dist.all_gather(local_bytes, torch.tensor(local))
    else:
        local_bytes = [torch.tensor(local)]
    result = {
        "losses": losses,
        "quantized_bytes_per_rank": [int(b) for b in local_bytes],
        "quantized_bytes_total": total,
    }
    if args.checkpoint_dir:
        result["checkpoint_resumes"] = checkpoint_round_trip(
            model, opt, fmt, adapter, bits, args, world, rank, data[-1]
        )
    return result, adapters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases", default="nf4:lora", help="comma-separated format:adapter[:optimizer bits 32|8] (default 32)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="global batch (divisible by the number of ranks)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-shard", action="store_true", help="the same run without FSDP (one process)")
    parser.add_argument("--checkpoint-dir", default="", help="also save, load and resume a sharded checkpoint")
    parser.add_argument("--out", default="", help="JSON results (rank 0); adapters go next to it as .pt")
    args = parser.parse_args(argv)

    distributed = "RANK" in os.environ
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if args.batch % world:
        parser.error(f"--batch {args.batch} is not divisible by {world} ranks")
    if args.no_shard and world > 1:
        parser.error("--no-shard runs in one process")
    if args.checkpoint_dir == "auto":  # one folder for all ranks
        folder = [tempfile.mkdtemp(prefix="qft-fsdp-") if rank == 0 else None]
        if distributed:
            dist.broadcast_object_list(folder, src=0)
        args.checkpoint_dir = folder[0]
    try:
        results, adapters = {}, {}
        for case in args.cases.split(","):
            fmt, adapter, *bits = case.split(":")
            results[case], adapters[case] = run_case(fmt, adapter, int(bits[0]) if bits else 32, args, world, rank)
            if rank == 0:
                r = results[case]
                held, whole = r["quantized_bytes_per_rank"][0], r["quantized_bytes_total"]
                print(
                    f"{case}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}; "
                    f"quantized weights {held} of {whole} bytes on rank 0"
                )
        if rank == 0 and args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
            torch.save(
                {case: {n: t.cpu() for n, t in a.items()} for case, a in adapters.items()},
                Path(args.out).with_suffix(".pt"),
            )
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
