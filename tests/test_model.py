import pytest
import torch
import torch.nn.functional as F

from clearlm.model.hf import load_hf, save_hf
from clearlm.model.loss import linear_cross_entropy_sum
from clearlm.model.transformer import Transformer, TransformerConfig


def _model(**kw) -> Transformer:
    cfg = TransformerConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, context=48, **kw)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():  # larger weights than at init, so the comparison is not trivially small
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 3.0))
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "n_kv_heads": 2, "rope_theta": 500.0}])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    model = _model(**kw)
    save_hf(model, tmp_path, bos_id=0, eos_id=0, pad_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 300, (3, 48))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-4


def test_import_round_trip_is_exact(tmp_path):
    model = _model(tie_embeddings=False)
    save_hf(model, tmp_path, 0, 0, 1)
    again = load_hf(tmp_path)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_fused_cross_entropy_matches_pytorch_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(700, 16, requires_grad=True)
    w = torch.randn(5000, 16, requires_grad=True)  # several chunks of rows
    t = torch.randint(0, 5000, (700,))
    t[::5] = -100
    ours = linear_cross_entropy_sum(h, w, t)
    (ours * 0.5).backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_h, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, w.grad, rtol=1e-4, atol=1e-5)


def test_loss_sum_equals_cross_entropy_of_logits():
    model = _model()
    ids = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        ref = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].reshape(-1), reduction="sum")
        torch.testing.assert_close(model.loss_sum(ids[:, :-1], ids[:, 1:]), ref, rtol=1e-5, atol=1e-3)


def test_causality_and_context_limit():
    model = _model()
    ids = torch.randint(0, 300, (1, 20))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 300
    with torch.no_grad():
        assert torch.equal(model(ids)[0, :10], model(changed)[0, :10])
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 49, dtype=torch.long))
