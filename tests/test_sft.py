"""Chat template, SFT data and SFT loss: equal to transformers' and TRL's on the same model and data."""

from __future__ import annotations

import pytest
import torch
from conftest import CONVERSATIONS, hf_chat_tokenizer, tiny_decoder

from clearlm.data.chat import BadRow, ChatTemplate, Example, parse_sft_row, read_sft, tokenize_sft
from clearlm.train.sft import mean_loss, pack, pad, prepare


def test_template_ids_and_assistant_mask_equal_apply_chat_template(chat_tok):
    hf, template = hf_chat_tokenizer(chat_tok), ChatTemplate()
    for messages in CONVERSATIONS:
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = template.encode(chat_tok, messages)
        assert ids == theirs["input_ids"] and mask == theirs["assistant_masks"]
        prompt = hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
        assert template.encode(chat_tok, messages[:-1], add_generation_prompt=True)[0] == list(prompt["input_ids"])
    ids, mask = template.encode(chat_tok, CONVERSATIONS[0])
    trained = chat_tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert trained == "It is blue.<|endoftext|>", "the end-of-turn token is trained"


def test_changing_user_or_system_text_changes_inputs_not_labels(chat_tok):
    template = ChatTemplate()
    a = tokenize_sft(chat_tok, template, Example(messages=CONVERSATIONS[1]))
    edited = [dict(m) for m in CONVERSATIONS[1]]
    edited[0]["content"], edited[1]["content"] = "You answer at length.", "And the grass?"
    b = tokenize_sft(chat_tok, template, Example(messages=edited))
    assert a[0] != b[0]
    assert [t for t in a[1] if t != -100] == [t for t in b[1] if t != -100]


def test_bad_rows_are_reported_with_reasons(tmp_path):
    rows = ['{"messages": [{"role": "user", "content": "hi"}]}',
            '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
            '{"messages": [{"content": "hi"}]}', "{not json",
            '{"instruction": "Add 2 and 2.", "input": "", "output": "4"}',
            '{"prompt": "2+2=", "completion": "4"}', '{"text": "plain"}']  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    results = list(read_sft(tmp_path / "d.jsonl"))
    reasons = [(w.rsplit(":", 1)[1], str(r)) for w, r in results if isinstance(r, BadRow)]
    assert [n for n, _ in reasons] == ["1", "2", "3", "4", "5", "8"]
    assert "no assistant turn" in reasons[0][1] and "role must be one of" in reasons[1][1]
    assert "empty assistant turn" in reasons[2][1] and "invalid JSON" in reasons[4][1]
    alpaca = parse_sft_row({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert alpaca.messages == [
        {"role": "user", "content": "Translate.\nHallo"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_packed_and_padded_batches_give_the_same_loss(chat_tok):
    items, counts = prepare([Example(messages=c) for c in CONVERSATIONS], chat_tok, ChatTemplate(), 64)
    assert counts["examples"] == 4
    model = tiny_decoder(chat_tok.get_vocab_size())
    padded = mean_loss(model, [pad(items, 1)])
    packed_batch = pack(items, 64, 1)
    assert packed_batch.idx.shape[0] < len(items), "several examples share a row"
    assert mean_loss(model, [packed_batch]) == pytest.approx(padded, abs=1e-5)
    assert mean_loss(model, [pad(items[:1], 1), pad(items[1:], 1)]) == pytest.approx(padded, abs=1e-5)


def test_truncation_is_counted_and_examples_without_trained_tokens_dropped(chat_tok):
    long = Example(messages=[{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}])
    items, counts = prepare([long, Example(messages=CONVERSATIONS[0])], chat_tok, ChatTemplate(), 24)
    assert counts["truncated"] >= 1 and counts["dropped: no trained token within max_length"] == 1
    assert len(items) == 1


@pytest.mark.slow
def test_sft_loss_equals_trl(chat_tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    from clearlm.model.hf import save_hf

    model = tiny_decoder(chat_tok.get_vocab_size())
    eos, pad_id = chat_tok.token_to_id("<|endoftext|>"), chat_tok.token_to_id("<|pad|>")
    save_hf(model, tmp_path / "m", bos_id=eos, eos_id=eos, pad_id=pad_id)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)

    def args(assistant_only_loss: bool):  # TRL defaults to bf16 and gradient checkpointing: both off on CPU
        return trl.SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False,
                             gradient_checkpointing=False, report_to=[], save_strategy="no", max_steps=1,
                             per_device_train_batch_size=len(CONVERSATIONS), assistant_only_loss=assistant_only_loss,
                             max_length=64, seed=0, dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip

    trainer = trl.SFTTrainer(model=hf_model, args=args(True), processing_class=hf_chat_tokenizer(chat_tok),
                             train_dataset=datasets.Dataset.from_dict({"messages": CONVERSATIONS}))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(batch)).item()
    items, _ = prepare([Example(messages=c) for c in CONVERSATIONS], chat_tok, ChatTemplate(), 64)
    assert mean_loss(model, [pad(items, pad_id)]) == pytest.approx(theirs, abs=1e-5)
    completion = [{"prompt": "What color is the sky?", "completion": " It is blue."}]
    trainer = trl.SFTTrainer(model=hf_model, args=args(False),
                             processing_class=hf_chat_tokenizer(chat_tok),
                             train_dataset=datasets.Dataset.from_list(completion))  # fmt: skip
    prepared = trainer.train_dataset[0]
    ids, labels = tokenize_sft(chat_tok, ChatTemplate(), Example(**completion[0]))
    assert ids == prepared["input_ids"] and labels == prepared["labels"]


def test_length_groups_are_the_cheapest_cut_of_the_sorted_items():
    """Every item once, at most max_rows per pass, sorted by length, and no cut of the sorted items costs less
    (padded tokens + PASS_OVERHEAD per pass; brute force over every cut)."""
    import itertools
    import random

    from clearlm.train.posttrain import PASS_OVERHEAD, length_groups

    def cost(groups, lengths, rows_each):
        return sum(len(g) * rows_each * max(lengths[i] for i in g) + PASS_OVERHEAD for g in groups)

    assert length_groups([10, 200, 12, 198], 4) == [[0, 2], [3, 1]]  # 2 x 12 + 2 x 200 + 2 passes < 4 x 200 + 1
    assert length_groups([100, 101, 102], 4) == [[0, 1, 2]]  # nothing to save: one pass
    assert sorted(map(len, length_groups([5] * 5, 2))) == [1, 2, 2]
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 400)]) for _ in range(rng.randint(1, 8))]
        max_rows, rows_each = rng.randint(1, 5), rng.randint(1, 2)
        groups = length_groups(lengths, max_rows, rows_each)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) <= max_rows for g in groups)
        flat = [lengths[i] for g in groups for i in g]
        assert flat == sorted(flat)
        n, best = len(lengths), float("inf")
        order = sorted(range(n), key=lambda i: (lengths[i], i))
        for cuts in itertools.product([False, True], repeat=n - 1):
            bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
            parts = [order[a:b] for a, b in itertools.pairwise(bounds)]
            if all(len(p) <= max_rows for p in parts):
                best = min(best, cost(parts, lengths, rows_each))
        assert cost(groups, lengths, rows_each) == best


def test_an_sft_step_in_passes_of_similar_lengths_has_the_gradient_of_one_padded_batch(chat_tok):
    """A step is cut into passes by length; its gradient is the one of all its examples padded together (the loss
    is summed, then divided by the step's trained tokens)."""
    from clearlm.model.transformer import Transformer, TransformerConfig
    from clearlm.recipe import SFTConfig
    from clearlm.train.posttrain import length_groups
    from clearlm.train.sft import loss_sum, step_backward

    long = [[{"role": "user", "content": f"Count to {n}."},
             {"role": "assistant", "content": " ".join(map(str, range(n)))}] for n in (90, 100, 110, 120)]  # fmt: skip
    items, _ = prepare([Example(messages=c) for c in [*CONVERSATIONS, *long]], chat_tok, ChatTemplate(), 512)
    assert len(length_groups([i.length for i in items], len(items))) > 1, "the step is cut into several passes"
    cfg = TransformerConfig(vocab_size=chat_tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, context=512)
    model, reference = Transformer(cfg), Transformer(cfg)
    model.init_weights(0)
    reference.load_state_dict(model.state_dict())
    batch = pad(items, 1)
    (loss_sum(reference, batch) / batch.trained).backward()
    logged = step_backward(model, items, SFTConfig(builtin="stdlib-functions", micro_batch_size=len(items)), 511, 1)
    assert logged["trained_tokens"] == batch.trained and logged["tokens"] < batch.idx.numel()
    assert logged["loss"] == pytest.approx(mean_loss(reference, [batch]), abs=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5)
