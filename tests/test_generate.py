"""The generation engine: token-identical to transformers' greedy `generate`, reproducible sampling, stops."""

import pytest
import torch

from clearlm.model.auto import TransformersCausalLM
from clearlm.model.generate import Sampling, _ClearlmRunner, choose, generate
from clearlm.model.hf import save_hf
from clearlm.model.transformer import Projection, Transformer, TransformerConfig
from clearlm.numerics import mkl_strict

transformers = pytest.importorskip("transformers")

PROMPTS = [[0, 5, 17, 42], [0, 9], [0, 3, 3, 3, 3, 3, 3, 3, 3, 8, 100], [0, 250, 4, 7, 7], [0, 61, 2], [0, 77] * 6]


def _model(**kw) -> Transformer:
    cfg = TransformerConfig(**{"vocab_size": 300, "d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, **kw})
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():  # sharper distributions than at init: a real model's margins, not near-ties
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 3.0))
    return model.eval()


def _hf_greedy(hf, prompts: list[list[int]], new: int, eos: int | None) -> list[list[int]]:
    """transformers' generate on one left-padded batch; each row's tokens up to (without) its end-of-text."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=1,
                      eos_token_id=eos)  # fmt: skip
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    return rows


def _batched_like_ours(hf, prompts, new, eos, batch_size):
    """The reference run on the same batches the engine forms (longest prompts first)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, tokens in zip(chunk, _hf_greedy(hf, [prompts[i] for i in chunk], new, eos), strict=True):
            out[i] = tokens
    return out


@pytest.mark.parametrize(
    ("kw", "batch_size"),
    [({}, 1), ({}, 6), ({"n_kv_heads": 2, "tie_embeddings": False}, 4),
     ({"architecture": "olmo2", "n_kv_heads": 2, "rope_theta": 5e5}, 4)],
)  # fmt: skip
def test_greedy_is_token_identical_to_transformers(tmp_path, kw, batch_size):
    model = _model(**kw)
    save_hf(model, tmp_path, bos_id=0, eos_id=2, pad_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = _batched_like_ours(hf, PROMPTS, 24, 2, batch_size)
    ours = generate(model, PROMPTS, max_new_tokens=24, eos_ids=[2], batch_size=batch_size)
    assert [c.tokens for c in ours] == expected
    assert any(c.finish == "eos" for c in ours) or all(len(c.tokens) == 24 for c in ours)
    # the same engine driving transformers' own model and cache gives the same tokens
    wrapped = generate(TransformersCausalLM(hf, 64), PROMPTS, max_new_tokens=24, eos_ids=[2], batch_size=batch_size)
    assert [c.tokens for c in wrapped] == expected


@pytest.mark.parametrize("kw", [{}, {"architecture": "olmo2", "n_kv_heads": 2}, {"n_kv_heads": 1}])
def test_prompts_sharing_a_prefix_run_it_once_and_generate_as_transformers_does(tmp_path, monkeypatch, kw):
    """Few-shot prompts (one 50-token prefix, then their own questions) and copies of one prompt (RL's groups)."""
    model = _model(**kw, context=128)
    save_hf(model, tmp_path, bos_id=0, eos_id=2, pad_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(5)
    shots = [0, *torch.randint(3, 300, (49,), generator=gen).tolist()]
    prompts = [shots + torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 7, 20, 3, 12)]
    prompts += [prompts[2]] * 3
    shared = []
    monkeypatch.setattr(_ClearlmRunner, "share", lambda self, prefix, share=_ClearlmRunner.share: (
        shared.append(len(prefix)), share(self, prefix))[1])  # fmt: skip
    ours = generate(model, prompts, max_new_tokens=24, eos_ids=[2], batch_size=8)
    assert shared == [50]
    assert [c.tokens for c in ours] == _batched_like_ours(hf, prompts, 24, 2, 8)
    copies = generate(model, [prompts[2]] * 4, max_new_tokens=24, eos_ids=[2], batch_size=4)
    assert shared == [50, len(prompts[2]) - 1]
    assert all(c.tokens == ours[2].tokens for c in copies)


def test_copies_of_short_prompts_are_prefilled_once_and_generate_as_transformers_does(tmp_path, monkeypatch):
    """RL's groups: each of three prompts of other lengths (padded, shorter than a shared prefix) four times."""
    model = _model(n_kv_heads=2)
    save_hf(model, tmp_path, bos_id=0, eos_id=2, pad_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]
    prefills = []
    monkeypatch.setattr(Transformer, "forward_cached", lambda self, ids, *a, f=Transformer.forward_cached: (
        prefills.append(ids.shape[1]) if ids.shape[1] > 1 else None, f(self, ids, *a))[1])  # fmt: skip
    ours = generate(model, prompts, max_new_tokens=16, eos_ids=[2], batch_size=12)
    assert sorted(prefills) == sorted(len(p) for p in PROMPTS[:3])
    assert [c.tokens for c in ours] == _batched_like_ours(hf, prompts, 16, 2, 12)
    sampled = generate(model, prompts, max_new_tokens=16, sampling=Sampling(1.0, seed=3), batch_size=12)
    alone = generate(model, prompts, max_new_tokens=16, sampling=Sampling(1.0, seed=3), batch_size=1)
    assert [c.tokens for c in sampled] == [c.tokens for c in alone]
    assert len({tuple(c.tokens) for c in sampled[:4]}) > 1  # copies draw from their own generators


def test_a_non_llama_transformers_model_generates_as_transformers_does(tmp_path):
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)
    expected = _batched_like_ours(hf, PROMPTS, 16, 2, 3)
    ours = generate(TransformersCausalLM(hf, 64), PROMPTS, max_new_tokens=16, eos_ids=[2], batch_size=3, pad_id=1)
    assert [c.tokens for c in ours] == expected


def test_a_continuation_does_not_depend_on_its_batch():
    model = _model(n_kv_heads=2)
    alone = [generate(model, [p], max_new_tokens=20)[0].tokens for p in PROMPTS]
    together = generate(model, PROMPTS, max_new_tokens=20, batch_size=len(PROMPTS))
    assert [c.tokens for c in together] == alone


def test_sampling_is_reproducible_under_a_seed_whatever_the_batching():
    model = _model()
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    first = generate(model, PROMPTS, max_new_tokens=16, sampling=sampling, batch_size=2)
    again = generate(model, PROMPTS, max_new_tokens=16, sampling=sampling, batch_size=5)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    other = generate(model, PROMPTS, max_new_tokens=16, sampling=Sampling(1.0, 50, 0.9, seed=4), batch_size=2)
    assert [c.tokens for c in other] != [c.tokens for c in first]
    greedy = generate(model, PROMPTS, max_new_tokens=16)
    assert [c.tokens for c in first] != [c.tokens for c in greedy]
    # repeats of one prompt are different samples (each prompt index has its own generator)
    repeats = generate(model, [PROMPTS[0]] * 4, max_new_tokens=16, sampling=sampling)
    assert len({tuple(c.tokens) for c in repeats}) > 1


def test_top_k_and_top_p_keep_what_transformers_warpers_keep():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    for k, p in ((5, 1.0), (0, 0.8), (10, 0.5), (0, 0.05)):
        expected = logits.clone()
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1:
            expected = TopPLogitsWarper(p)(None, expected)
        kept = torch.isfinite(expected)
        # a token is drawn only from what the warpers keep: draw many times and look
        drawn = torch.zeros_like(kept)
        gens = [torch.Generator().manual_seed(i) for i in range(8)]
        for _ in range(300):
            picks = choose(logits, Sampling(1.0, k, p), gens)
            drawn[torch.arange(8), picks] = True
        assert not (drawn & ~kept).any(), (k, p)
        if p <= 0.05:  # only the top token survives
            assert drawn.sum(1).eq(1).all()


def test_stop_strings_and_eos_end_a_continuation():
    model = _model()
    texts = {i: f"<{i}>" for i in range(300)}

    def decode(ids: list[int]) -> str:
        return "".join(texts[i] for i in ids)

    prompts = PROMPTS[1:3]
    free = generate(model, prompts, max_new_tokens=12, decode=decode)
    assert all(c.finish == "length" and len(c.tokens) == 12 for c in free)
    tokens = free[0].tokens
    at = next(i for i in range(1, 12) if tokens[i] not in tokens[:i])  # a token not generated before
    stopped = generate(model, prompts, max_new_tokens=12, decode=decode, stop=[texts[tokens[at]]])
    assert stopped[0].finish == "stop" and stopped[0].tokens == tokens[: at + 1]
    assert stopped[0].text == decode(tokens[:at])  # cut before the stop string
    assert stopped[1].tokens == free[1].tokens  # the other prompt goes on to its budget
    ended = generate(model, prompts, max_new_tokens=12, decode=decode, eos_ids=[tokens[at]])
    assert ended[0].finish == "eos" and ended[0].tokens == tokens[:at]


def test_long_prompts_keep_their_last_tokens_and_bad_settings_are_refused():
    model = _model()
    long = list(range(2, 100))
    out = generate(model, [long], max_new_tokens=8)[0]
    assert out.tokens == generate(model, [long[-56:]], max_new_tokens=8)[0].tokens
    with pytest.raises(ValueError, match="no room"):
        generate(model, [long], max_new_tokens=64)
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="decode"):
        generate(model, [[0]], max_new_tokens=4, stop=["x"])
    with pytest.raises(ValueError, match="sampling"):
        Sampling(temperature=-1)


def test_sampling_draws_tokens_in_proportion_and_never_a_filtered_one():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(20000)]
    drawn = choose(logits, Sampling(temperature=1.0), gens)
    counts = torch.bincount(drawn, minlength=6).float() / 20000
    assert counts[1] == 0 and counts[5] == 0
    assert torch.allclose(counts, probs, atol=0.015)
    top2 = torch.bincount(choose(logits, Sampling(temperature=1.0, top_k=2), gens), minlength=6)
    assert set(top2.nonzero()[:, 0].tolist()) == {0, 2}


@pytest.mark.skipif(not mkl_strict(), reason="the transposed layout is taken under MKL's strict mode only")
def test_the_transposed_products_generation_uses_give_the_bits_of_f_linear():
    """Generation multiplies by transposed copies of the weights (faster under strict MKL); greedy tokens equal to
    transformers' rest on these products giving F.linear's bits, at the shapes of a step and of a prefill."""
    model = _model()
    weights = model.decode_weights()
    assert weights.lm_head.transposed and weights.lm_head.weight.shape == (64, 300)
    gen = torch.Generator().manual_seed(0)
    for rows, k, n in [
        (1, 512, 32000),
        (3, 1408, 512),
        (16, 512, 2816),
        (17, 192, 576),
        (300, 768, 4096),
        (5, 37, 1000),
    ]:
        w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
        assert torch.equal(Projection(w, True)(x), torch.nn.functional.linear(x, w)), (rows, k, n)
