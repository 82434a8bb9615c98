"""SFT and DPO steps: clearlm against TRL's SFTTrainer and DPOTrainer on the same model, data and batches.

The model is the quickstart's shape (Llama, 192 wide, 4 layers, vocabulary 4096, context 256), randomly
initialised, in float32 on CPU with the same thread count, TRL's bf16 and gradient checkpointing turned
off. Data: the built-in "write this standard-library function" conversations and preference pairs,
in the same order for both (TRL's sampler made sequential). Each run is a fresh process; prints
tokens/s (non-padding tokens through the model per second of optimizer steps), the ratio, peak RSS and
the largest difference between the two tools' losses over the steps.

    python benchmarks/posttrain_vs_trl.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, LAYERS, HEADS, VOCAB, CONTEXT = 192, 4, 6, 4096, 256


def quickstart_model(workdir: Path):
    """(tokenizer, random model of the quickstart's shape, the stdlib corpus file), the corpus and tokenizer made once
    in `workdir`."""
    import torch

    from clearlm.data.builtin import stdlib_documents
    from clearlm.data.tokenizer import load_tokenizer, train_tokenizer
    from clearlm.model.transformer import Transformer, TransformerConfig
    from clearlm.recipe import TokenizerConfig

    corpus = workdir / "train.jsonl"
    if not corpus.exists():
        with open(corpus, "w") as f:
            for doc in stdlib_documents():
                f.write(json.dumps(doc) + "\n")
        train_tokenizer(TokenizerConfig(vocab_size=VOCAB), corpus, workdir)
    tok = load_tokenizer(workdir)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tok.get_vocab_size(), d_model=WIDTH, n_layers=LAYERS,
                                          n_heads=HEADS, context=CONTEXT))  # fmt: skip
    model.init_weights(0)
    return tok, model, corpus


def _setup(workdir: Path, n: int):
    from clearlm.data.instructions import stdlib_function_examples, stdlib_function_pairs

    tok, model, corpus = quickstart_model(workdir)
    return tok, model, stdlib_function_examples(corpus, n), stdlib_function_pairs(corpus, n)


def hf_copy(tok, model, folder: Path):
    """The model saved as a transformers folder and loaded back, and the tokenizer with clearlm's chat template."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from clearlm.data.chat import ChatTemplate
    from clearlm.model.hf import save_hf

    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    save_hf(model, folder, bos_id=eos, eos_id=eos, pad_id=pad)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf_tok.chat_template = ChatTemplate().source
    return AutoModelForCausalLM.from_pretrained(folder), hf_tok


def _trl_args(trl, kind: str, out: Path, steps: int, batch: int):
    common = dict(output_dir=str(out), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                  report_to=[], save_strategy="no", max_steps=steps, logging_steps=1, learning_rate=1e-4,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, per_device_train_batch_size=batch,
                  seed=0, dataloader_num_workers=0, disable_tqdm=True, max_length=CONTEXT)  # fmt: skip
    if kind == "sft":
        return trl.SFTConfig(**common, assistant_only_loss=True)
    return trl.DPOConfig(**common, beta=0.1, loss_type="sigmoid")


def run(tool: str, kind: str, steps: int, batch: int, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(2)
    tok, model, examples, pairs = _setup(workdir, steps * batch)
    losses, tokens = [], 0
    if tool == "trl":
        import datasets
        import trl
        from torch.utils.data import SequentialSampler

        hf_model, hf_tok = hf_copy(tok, model, workdir / f"hf-{kind}")
        if kind == "sft":
            data = datasets.Dataset.from_dict({"messages": [e.messages for e in examples]})
            trainer = trl.SFTTrainer(model=hf_model, args=_trl_args(trl, kind, workdir / "out", steps, batch),
                                     processing_class=hf_tok, train_dataset=data)  # fmt: skip
        else:
            ref, _ = hf_copy(tok, model, workdir / "hf-ref")
            rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
            args = _trl_args(trl, kind, workdir / "out", steps, batch)
            trainer = trl.DPOTrainer(model=hf_model, ref_model=ref, args=args, processing_class=hf_tok,
                                     train_dataset=datasets.Dataset.from_list(rows))  # fmt: skip
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
        for b in trainer.get_train_dataloader():
            tokens += int(b["attention_mask"].sum())
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    else:
        from clearlm.data.chat import ChatTemplate, tokenize_pair
        from clearlm.recipe import DPOConfig
        from clearlm.train.dpo import TokenizedPair, answer_lengths, dpo_loss, reference_logps, sequence_logps, truncate
        from clearlm.train.loop import clip_gradients
        from clearlm.train.sft import loss_sum, pad, prepare

        pad_id = tok.token_to_id("<|pad|>")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
        started = time.perf_counter()
        if kind == "sft":
            items, _ = prepare(examples, tok, ChatTemplate(), CONTEXT)
            for i in range(steps):
                batch_ = pad(items[i * batch : (i + 1) * batch], pad_id)
                tokens += sum(len(it.inputs) + 1 for it in items[i * batch : (i + 1) * batch])
                loss = loss_sum(model, batch_)
                (loss / batch_.trained).backward()
                clip_gradients(model, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item() / batch_.trained)
        else:
            cfg = DPOConfig(builtin="stdlib-functions", loss="sigmoid", beta=0.1)
            tokenized, _ = truncate([TokenizedPair(*tokenize_pair(tok, ChatTemplate(), p), i)
                                     for i, p in enumerate(pairs)], CONTEXT)  # fmt: skip
            ref = reference_logps(model, tokenized, pad_id)  # counted in the time: TRL runs its reference too
            model.train()
            for i in range(steps):
                part = tokenized[i * batch : (i + 1) * batch]
                tokens += sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in part)
                chosen, rejected = sequence_logps(model, part, pad_id)
                sl = slice(i * batch, (i + 1) * batch)
                loss, _ = dpo_loss(chosen, rejected, ref[0][sl], ref[1][sl], answer_lengths(part), cfg)
                loss.backward()
                clip_gradients(model, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "losses": losses, "peak_mb": peak}


def worker_environment(tool: str) -> dict[str, str]:
    """A worker's environment: TRL runs with MKL's default mode, as its users have it; clearlm's worker sets its strict
    reproducible mode itself when it imports clearlm."""
    from clearlm.numerics import PEER_ENVIRONMENT

    return {**os.environ, **(PEER_ENVIRONMENT if tool == "trl" else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", choices=["sft", "dpo"], help="run one of the two comparisons")
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run(*args.worker, args.steps, args.batch, args.workdir)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="clearlm-posttrain-"))
    results = {}
    for kind in [args.only] if args.only else ["sft", "dpo"]:
        batch = args.batch if kind == "sft" else args.batch // 2
        for tool in ("trl", "clearlm"):
            out = subprocess.run([sys.executable, __file__, "--worker", tool, kind, "--steps", str(args.steps),
                                  "--batch", str(batch), "--workdir", str(workdir)], env=worker_environment(tool),
                                 capture_output=True, text=True, check=True)  # fmt: skip
            results[(tool, kind)] = json.loads(out.stdout.strip().splitlines()[-1])
        trl_r, ours = results[("trl", kind)], results[("clearlm", kind)]
        diff = max(abs(a - b) for a, b in zip(trl_r["losses"], ours["losses"], strict=False))
        print(f"{kind.upper()}: {args.steps} steps, batch {batch}")
        for tool, r in (("TRL", trl_r), ("clearlm", ours)):
            print(f"  {tool:<8} {r['tokens_per_s']:8,.0f} tokens/s  peak {r['peak_mb']:6.0f} MB  "
                  f"first losses {[round(x, 4) for x in r['losses'][:3]]}")  # fmt: skip
        print(f"  ratio {ours['tokens_per_s'] / trl_r['tokens_per_s']:.2f}x; largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
