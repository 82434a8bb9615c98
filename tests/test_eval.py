import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from clearlm.eval.perplexity import domain_bits_per_byte, rolling_windows
from clearlm.eval.scoring import Encoder, score_choices, score_requests, score_windows
from clearlm.model.generate import Sampling, complete
from clearlm.model.transformer import Transformer, TransformerConfig


def _lm_eval_windows(token_list, prefix_token, max_seq_len, context_len=1):
    """lm-evaluation-harness's get_rolling_token_windows + make_disjoint_window, transcribed."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    out = [([prefix_token, *token_list[: first_seq_len - 1]], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        out.append(
            (
                token_list[window_end - max_seq_len - 1 : window_end - 1],
                token_list[window_end - window_pred_len : window_end],
            )
        )
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in out]


def test_rolling_windows_predict_every_token_once_with_lm_eval_contexts():
    for n in (1, 5, 16, 17, 40):
        tokens = list(range(100, 100 + n))
        ours = rolling_windows(tokens, 0, 16)
        assert [t for _, t in ours for t in t] == tokens
        for (inp, targets), (ctx, cont) in zip(ours, _lm_eval_windows(tokens, 0, 16), strict=True):
            assert targets == cont
            assert (ctx + cont)[:-1][-16:] == inp, "the model sees the same input as in lm-eval"


def _char_tokenizer() -> Tokenizer:
    vocab = {chr(i): i - 32 for i in range(32, 127)} | {"<eos>": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


def test_bits_per_byte_equals_a_direct_computation():
    cfg = TransformerConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=2, context=8)
    model = Transformer(cfg)
    model.init_weights(1)
    tok = _char_tokenizer()
    docs = [{"source": "a", "text": "hello world"}, {"source": "b", "text": "abc"}, {"source": "a", "text": "xyz!"}]
    result = domain_bits_per_byte(model, tok, docs, prefix_id=95, batch_size=2)
    nll = {"a": 0.0, "b": 0.0}
    for doc in docs:  # one unbatched, unpadded forward per lm-eval window
        for ctx, cont in _lm_eval_windows(tok.encode(doc["text"]).ids, 95, 8):
            inp = (ctx + cont)[:-1][-8:]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([inp]))[0], -1)
            nll[doc["source"]] -= sum(logp[len(inp) - len(cont) + j, t].item() for j, t in enumerate(cont))
    assert math.isclose(result["a"]["bits_per_byte"], nll["a"] / math.log(2) / 15, rel_tol=1e-4)
    assert math.isclose(result["b"]["bits_per_byte"], nll["b"] / math.log(2) / 3, rel_tol=1e-4)
    assert math.isclose(result["all"]["bits_per_byte"], (nll["a"] + nll["b"]) / math.log(2) / 18, rel_tol=1e-4)
    assert result["a"]["documents"] == 2 and result["all"]["bytes"] == 18


def test_generation_is_seeded_and_greedy_is_deterministic():
    cfg = TransformerConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=2, context=16)
    model = Transformer(cfg)
    model.init_weights(0)
    tok = _char_tokenizer()
    a = complete(model, tok, "hi", max_new_tokens=12, sampling=Sampling(1.0, seed=1))
    assert a == complete(model, tok, "hi", max_new_tokens=12, sampling=Sampling(1.0, seed=1))
    assert a != complete(model, tok, "hi", max_new_tokens=12, sampling=Sampling(1.0, seed=2))
    greedy = complete(model, tok, "hi", max_new_tokens=12)
    assert greedy == complete(model, tok, "hi", max_new_tokens=12, sampling=Sampling(0.0, seed=5))
    assert len(greedy.split(" ")) == 12  # the word-level test tokenizer decodes with spaces


def test_choices_over_one_pass_of_their_context_score_as_whole_windows(monkeypatch):
    """A question's choices scored over the context's cached keys and values give the log-probabilities (and greedy
    flags) of scoring each (context, choice) whole; a context that needs truncating falls back to whole windows."""
    cfg = TransformerConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context=40)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    model.eval()
    gen = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(3, 96, (n,), generator=gen).tolist()

    questions = [(toks(20), [toks(1), toks(4), toks(7), toks(2)]), (toks(3), [toks(5), toks(5)]),
                 (toks(35), [toks(3), toks(9)])]  # the last needs truncating: whole windows  # fmt: skip
    for ctx, conts in questions:
        windows = [((ctx + c)[-41:][:-1], c[-40:]) for c in conts]
        whole = score_windows(model, windows)
        if all(len(ctx) + len(c) <= 40 for c in conts):
            shared = score_choices(model, ctx, conts)
            assert [s.n_tokens for s in shared] == [s.n_tokens for s in whole]
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(shared, whole, strict=True))
            assert [s.is_greedy for s in shared] == [s.is_greedy for s in whole]
    # through score_requests, with a tokenizer: consecutive requests sharing a context go the shared way (here from
    # any saving; by default from SHARE_FROM context tokens saved and SHARE_CONTEXT in the context)
    import clearlm.eval.scoring as scoring

    calls = []
    monkeypatch.setattr(scoring, "SHARE_FROM", 1)
    monkeypatch.setattr(scoring, "SHARE_CONTEXT", 1)
    monkeypatch.setattr(scoring, "score_choices", lambda *a: calls.append(len(a[2])) or score_choices(*a))
    tok = _char_tokenizer()
    encoder = Encoder(tok, 0)
    requests = [("ab cd ef", " gh"), ("ab cd ef", " ij kl"), ("mn", " op"), ("ab cd ef", " qr")]
    got = score_requests(model, encoder, requests)
    assert calls == [2]
    expected = score_windows(model, [((c + t)[:-1], t) for c, t in (encoder.pair(*r) for r in requests)])
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got, expected, strict=True))
