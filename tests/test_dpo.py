"""Preference data and DPO losses: hand computations, and equality with TRL's DPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import hf_chat_tokenizer, tiny_decoder

from clearlm.data.chat import BadRow, ChatTemplate, Pair, parse_preference_row, read_preferences, tokenize_pair
from clearlm.recipe import DPOConfig
from clearlm.train.dpo import (
    TokenizedPair,
    answer_lengths,
    dpo_loss,
    pair_length,
    reference_logps,
    sequence_logps,
    split_held_out,
    step_backward,
)

PAIRS = [
    Pair([{"role": "user", "content": "What color is the sky?"}], [{"role": "assistant", "content": "It is blue."}],
         [{"role": "assistant", "content": "It is green."}]),
    Pair([{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a prime."}],
         [{"role": "assistant", "content": "Seven."}], [{"role": "assistant", "content": "Nine, a prime."}]),
    Pair([{"role": "user", "content": "def add(a, b):"}], [{"role": "assistant", "content": "    return a + b"}],
         [{"role": "assistant", "content": "    return a - b"}]),
]  # fmt: skip


def _cfg(loss: str, beta: float = 0.1) -> DPOConfig:
    return DPOConfig(builtin="stdlib-functions", loss=loss, beta=beta)


def test_losses_equal_a_hand_computation():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-14.0]), torch.tensor([-11.0]), torch.tensor([-12.0])
    lengths = (torch.tensor([4.0]), torch.tensor([8.0]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cases = {
        "sigmoid": -math.log(sig(0.1 * ((1.0) - (-2.0)))),
        "ipo": (1.0 / 4 - (-2.0) / 8 - 1 / (2 * 0.1)) ** 2,
        "sigmoid_norm": -math.log(sig(0.1 * (1.0 / 4 - (-2.0) / 8))),
        "simpo": -math.log(sig(0.1 * (-10.0 / 4 - (-14.0) / 8 - 0.5 / 0.1))),
    }
    for loss, expected in cases.items():
        value, metrics = dpo_loss(pc, pr, rc, rr, lengths, _cfg(loss))
        assert value.item() == pytest.approx(expected, rel=1e-6), loss
    _, metrics = dpo_loss(pc, pr, rc, rr, lengths, _cfg("sigmoid"))
    assert metrics["rewards/chosen"] == pytest.approx(0.1) and metrics["rewards/rejected"] == pytest.approx(-0.2)
    assert metrics["rewards/accuracies"] == 1.0 and metrics["rewards/margins"] == pytest.approx(0.3)


def test_preference_rows_in_every_format():
    hh = parse_preference_row(
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."}
    )
    assert hh == Pair("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " Go.")
    user = {"role": "user", "content": "q"}
    implicit = parse_preference_row({"chosen": [user, {"role": "assistant", "content": "a"}],
                                     "rejected": [user, {"role": "assistant", "content": "b"}]})  # fmt: skip
    assert implicit.prompt == [{"role": "user", "content": "q"}]
    with pytest.raises(BadRow, match="empty chosen"):
        parse_preference_row({"prompt": "q", "chosen": " ", "rejected": "b"})
    with pytest.raises(BadRow, match="expected chosen and rejected"):
        parse_preference_row({"prompt": "q", "chosen": "a"})


def test_preference_files_as_jsonl_and_as_a_json_array(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    lines = list(read_preferences(tmp_path / "p.jsonl"))
    items = list(read_preferences(tmp_path / "p.json"))
    assert [w.rsplit("/", 1)[1] for w, _ in lines] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]
    assert [w.rsplit("/", 1)[1] for w, _ in items] == ["p.json item 1", "p.json item 2"]
    assert lines[0][1] == items[0][1] == Pair("q", "a", "b")
    assert isinstance(items[1][1], BadRow) and "invalid JSON" in str(lines[2][1])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "sigmoid_norm", "ipo"])
def test_dpo_loss_and_rewards_equal_trl(chat_tok, tmp_path, loss):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    from clearlm.model.hf import save_hf

    policy, ref = tiny_decoder(chat_tok.get_vocab_size()), tiny_decoder(chat_tok.get_vocab_size())
    ref.init_weights(1)
    eos, pad_id = chat_tok.token_to_id("<|endoftext|>"), chat_tok.token_to_id("<|pad|>")
    hf = {}
    for name, m in (("policy", policy), ("ref", ref)):
        save_hf(m, tmp_path / name, bos_id=eos, eos_id=eos, pad_id=pad_id)
        hf[name] = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS]
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False,
                         gradient_checkpointing=False, report_to=[], save_strategy="no", max_steps=1, beta=0.1,
                         loss_type=loss, per_device_train_batch_size=len(PAIRS), max_length=64, seed=0,
                         dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = trl.DPOTrainer(model=hf["policy"], ref_model=hf["ref"], args=args,
                             processing_class=hf_chat_tokenizer(chat_tok),
                             train_dataset=datasets.Dataset.from_list(rows))  # fmt: skip
    prepared = trainer.train_dataset
    ours = [tokenize_pair(chat_tok, ChatTemplate(), p) for p in PAIRS]
    assert [list(x) for x in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"],
                                 strict=True)] == [list(x) for x in ours]  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    for logged in trainer._metrics.values():
        logged.clear()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(batch)).item()
    metrics = {k: v[-1] for logged in trainer._metrics.values() for k, v in logged.items() if v}
    pairs = [TokenizedPair(*x, row) for row, x in enumerate(ours)]
    with torch.no_grad():
        chosen, rejected = sequence_logps(policy, pairs, pad_id)
        ref_c, ref_r = sequence_logps(ref, pairs, pad_id)
        lengths = answer_lengths(pairs)
        value, mine = dpo_loss(chosen, rejected, ref_c, ref_r, lengths, _cfg(loss))
    assert value.item() == pytest.approx(theirs, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert mine[key] == pytest.approx(metrics[key], abs=1e-5), key


@pytest.mark.slow
def test_simpo_equals_trl_cpo_loss():
    from types import SimpleNamespace

    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    chosen, rejected = torch.tensor([-10.0, -30.0]), torch.tensor([-14.0, -12.0])
    lengths = (torch.tensor([4.0, 12.0]), torch.tensor([8.0, 3.0]))
    cfg = DPOConfig(builtin="stdlib-functions", loss="simpo", beta=2.0, simpo_gamma=0.5)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))  # fmt: skip
    losses, reward_c, reward_r = cpo.CPOTrainer.cpo_loss(trainer, chosen / lengths[0], rejected / lengths[1])
    ours, metrics = dpo_loss(chosen, rejected, torch.zeros(2), torch.zeros(2), lengths, cfg)
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(reward_c.mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(reward_r.mean().item(), abs=1e-6)


def test_held_out_pairs_are_chosen_by_content_not_row_number():
    pairs = [Pair(f"question {i}", f"good {i}", f"bad {i}") for i in range(200)]
    tokenized = [TokenizedPair([i], [1], [2], i) for i in range(200)]
    train, held = split_held_out(list(zip(pairs, tokenized, strict=True)), 0.2)
    assert 20 < len(held) < 60 and len(train) + len(held) == 200
    extra = (Pair("a new first row", "x", "y"), TokenizedPair([999], [1], [2], 200))
    _, held2 = split_held_out([extra, *zip(pairs, tokenized, strict=True)], 0.2)
    assert {t.prompt[0] for t in held2} - {999} == {t.prompt[0] for t in held}


def test_a_step_in_passes_of_similar_lengths_equals_one_batch_of_all_its_pairs():
    """Pairs are scored and trained in passes of similar lengths: the reference log-probabilities equal each pair's
    scored alone, and a step's loss, metrics and gradient equal those of all its pairs in one padded batch."""
    from clearlm.model.transformer import Transformer, TransformerConfig
    from clearlm.train.posttrain import length_groups

    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 64, (n,), generator=g).tolist()

    shapes = [(5, 3, 4), (6, 200, 180), (10, 7, 2), (8, 190, 210), (4, 5, 9), (7, 150, 170)]
    pairs = [TokenizedPair(ids(p), ids(c), ids(r), row) for row, (p, c, r) in enumerate(shapes)]
    assert len(length_groups([pair_length(p) for p in pairs], 6, 2)) > 1
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, context=256)
    model, reference = Transformer(cfg), Transformer(cfg)
    model.init_weights(0)
    reference.load_state_dict(model.state_dict())
    ref = reference_logps(model, pairs, 0, batch=4)
    alone = [sequence_logps(model, [p], 0) for p in pairs]
    torch.testing.assert_close(ref[0], torch.cat([c for c, _ in alone]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ref[1], torch.cat([r for _, r in alone]), atol=1e-4, rtol=0)
    ref = (ref[0] - 1.0, ref[1] + 0.5)  # a reference that differs from the policy, so the loss has a gradient
    model.train(), reference.train()
    dpo_cfg = _cfg("sigmoid_norm").model_copy(update={"micro_batch_size": len(pairs)})
    logged = step_backward(model, pairs, list(range(len(pairs))), ref, dpo_cfg, 0)
    chosen, rejected = sequence_logps(reference, pairs, 0)
    loss, metrics = dpo_loss(chosen, rejected, ref[0], ref[1], answer_lengths(pairs), dpo_cfg)
    loss.backward()
    assert logged["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5)
