"""Training-step throughput: clearlm's decoder against Hugging Face transformers' LlamaForCausalLM.

Both models get the same dimensions, batch, optimizer (AdamW), thread count and data; each is timed
over the same number of full training steps (forward, loss, backward, clipping, optimizer step)
after warm-up steps, alternating rounds so that machine noise hits both alike. Prints tokens/s, the
ratio, and the share of the machine's measured fp32 matmul peak each one reaches (MFU); the peak is
measured in every round and the highest kept, so a slow phase of a shared machine cannot inflate MFU.
A third row times clearlm's step's matmul and attention kernels alone (replayed with the same shapes and
layouts): the step time, and MFU, that no implementation could beat if all other work were free.
With `--allocator tuned` (the default) glibc keeps freed memory for both models, as `clearlm train`
does; `--allocator default` leaves glibc as it is for both, which is what a transformers user gets.

On a GPU (`--device cuda --precision bf16 --compile`) both run under bf16 autocast, clearlm with its
per-block compile and transformers compiled whole with `torch.compile`, and MFU is taken against the
GPU's dense bf16 peak from clearlm's datasheet table.

    python benchmarks/train_throughput.py [--d-model 256 --n-layers 4 ...]
    python benchmarks/train_throughput.py --device cuda --precision bf16 --compile \
        --vocab 50304 --d-model 768 --n-layers 12 --n-heads 12 --context 1024 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F
from step_options import add_step_options, autocast, clearlm_step
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.numerics import keep_freed_memory
from clearlm.recipe import TrainConfig
from clearlm.train.loop import accumulate_gradients, compile_blocks
from clearlm.train.optim import build_optimizer
from clearlm.train.perf import gpu_peak_flops, measure_matmul_peak


class KernelLog(TorchDispatchMode):
    """Keeps a copy of the operands of every matmul and attention kernel a step runs (the work its FLOPs count),
    so that those kernels can be timed alone: the step time, and MFU, that no implementation on the same
    kernel libraries could beat if everything else (norms, activations, optimizer) were free."""

    MATMULS = ("mm", "addmm", "addmm_", "bmm", "baddbmm")
    ATTENTION = ("scaled_dot_product", "efficient_attention", "flash_attention", "cudnn_attention")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name in self.MATMULS or any(part in name for part in self.ATTENTION):
            copies = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, copies, kwargs or {}))
        return func(*args, **(kwargs or {}))

    def replay(self) -> None:
        for func, operands, kwargs in self.calls:
            func(*operands, **kwargs)


def hf_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, clip: float, autocast: Any
) -> None:
    with autocast:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(ap)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--allocator", choices=("tuned", "default"), default="tuned")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.allocator == "tuned":
        keep_freed_memory()

    cfg = TransformerConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        context=args.context, tie_embeddings=True,
    )  # fmt: skip
    ours = Transformer(cfg)
    ours.init_weights(0)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as clearlm train does on GPUs
    theirs = LlamaForCausalLM(hf_cfg).to(device).train()
    ours.to(device).train()
    tcfg = TrainConfig()
    opt_ours = build_optimizer(ours, tcfg)
    opt_theirs = build_optimizer(theirs, tcfg)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, cfg.context + 1), device=device)
    tokens = args.batch * cfg.context

    hf_model: torch.nn.Module = theirs
    if args.compile:
        message = compile_blocks(ours, device)
        if message:
            raise SystemExit(message)
        hf_model = torch.compile(theirs)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    probe = Transformer(cfg).to(device).train()  # eager, so that every kernel passes the dispatcher
    with KernelLog() as kernels:
        accumulate_gradients(probe, [batch], autocast=autocast(args))
    runners = {
        "clearlm": lambda: clearlm_step(ours, opt_ours, batch, args),
        "transformers": lambda: hf_step(hf_model, opt_theirs, batch, 1.0, autocast(args)),
        "kernels alone": kernels.replay,
    }
    for run in runners.values():
        for _ in range(3 if args.compile else 2):
            run()
    best = dict.fromkeys(runners, float("inf"))
    peaks = []
    for _ in range(args.rounds):
        if device.type == "cpu":  # this machine's speed drifts: the peak is the best seen across the rounds
            peaks.append(measure_matmul_peak(args.threads, repeats=2))
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(gpu) or float("nan")
        machine = f"{gpu} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s from the datasheet table)"
    else:
        peak = max(peaks)
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads"
    flops = ours.flops_per_token()
    results = {
        "machine": machine,
        "torch": torch.__version__,
        "config": vars(args),
        "parameters": ours.num_params(),
        "matmul_peak_gflops": peak / 1e9,
    }
    for name, seconds in best.items():
        results[name] = {"tokens_per_s": tokens / seconds, "mfu": flops * tokens / seconds / peak}
    results["ratio"] = results["clearlm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print(f"{'model':<15}{'tokens/s':>12}{'MFU':>8}")
    for name in runners:
        print(f"{name:<15}{results[name]['tokens_per_s']:>12,.0f}{results[name]['mfu']:>8.1%}")
    print(f"ratio clearlm/transformers: {results['ratio']:.2f}x   (peak {peak / 1e9:.1f} GFLOP/s; {machine})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
