import pytest
import torch
import torch.nn.functional as F

from clearlm.model.hf import load_hf, save_hf
from clearlm.model.loss import _chunk_rows, fused_cross_entropy
from clearlm.model.transformer import Transformer, TransformerConfig


def _model(**kw) -> Transformer:
    cfg = TransformerConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, context=48, **kw)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():  # larger weights than at init, so the comparison is not trivially small
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 3.0))
    return model.eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": False, "n_kv_heads": 2, "rope_theta": 500.0},
        {"architecture": "olmo2", "tie_embeddings": False, "n_kv_heads": 2, "rope_theta": 500000.0},
        {"architecture": "olmo2"},
    ],
)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    model = _model(**kw)
    save_hf(model, tmp_path, bos_id=0, eos_id=0, pad_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == ("Olmo2ForCausalLM" if kw.get("architecture") == "olmo2" else "LlamaForCausalLM")
    ids = torch.randint(0, 300, (3, 48))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("architecture", ["llama", "olmo2"])
def test_import_round_trip_is_exact(tmp_path, architecture):
    model = _model(tie_embeddings=False, architecture=architecture)
    save_hf(model, tmp_path, 0, 0, 1)
    again = load_hf(tmp_path)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_fused_cross_entropy_matches_pytorch_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(700, 16, requires_grad=True)
    w = torch.randn(20000, 16, requires_grad=True)
    assert _chunk_rows(700, 20000, h.device) < 350  # several chunks of rows
    t = torch.randint(0, 20000, (700,))
    t[::5] = -100
    ours = fused_cross_entropy(h, w, t)[0]
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


def test_olmo2_block_normalises_sublayer_outputs_and_queries_and_keys():
    model = _model(architecture="olmo2")
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight",
            "layers.0.post_feedforward_layernorm.weight"} <= names  # fmt: skip
    assert not any("input_layernorm" in n for n in names)
    block, x = model.layers[0], torch.randn(1, 5, 64)
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    with torch.no_grad():
        block.self_attn.q_norm.weight.mul_(3.0)  # QK-norm's scale reaches the output
        h = x + block.post_attention_layernorm(block.self_attn(x, cos, sin))
        expected = h + block.post_feedforward_layernorm(block.mlp(h))
        torch.testing.assert_close(block(x, cos, sin), expected)
        raw = block.self_attn.q_proj(x)
        rms = raw.pow(2).mean(-1, keepdim=True).add(model.cfg.norm_eps).rsqrt()
        torch.testing.assert_close(block.self_attn.q_norm(raw), raw * rms * block.self_attn.q_norm.weight)


def test_z_loss_adds_its_formula_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(5000, 16, requires_grad=True)
    t = torch.randint(0, 5000, (300,))
    t[::7] = -100
    total, z = fused_cross_entropy(h, w, t, z_loss=1e-2)
    total.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = h @ w.T
    valid = t != -100
    lse = torch.logsumexp(logits, dim=-1)
    ref_z = 1e-2 * (lse.square() * valid).sum()
    ref = F.cross_entropy(logits, t, reduction="sum") + ref_z
    ref.backward()
    torch.testing.assert_close(z, ref_z.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_h, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, w.grad, rtol=1e-4, atol=1e-5)
    assert not z.requires_grad and z > 0


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = _model(architecture="olmo2").train()
    ids = torch.randint(0, 300, (2, 33))
    grads = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        model.zero_grad()
        loss, _ = model(ids[:, :-1], targets=ids[:, 1:], z_loss=1e-4)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1], strict=True))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"architecture": "olmo2", "n_kv_heads": 2}])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_prompt_run_once_for_its_completions_gives_each_rows_values_and_gradients(kw, checkpointed):
    """GRPO's loss pass runs a prompt once for its group of completions (`share_prompts`): every completion token's
    log-probability, and the weights' gradients, equal those of each row run on its own, padding, an empty
    completion, a one-token one and a prompt of its own included."""
    from clearlm.train.logps import answer_logps

    model = _model(**kw).train()
    model.checkpoint_blocks = checkpointed
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 300, (n,), generator=gen).tolist()

    first, second, short = ids(9), ids(4), ids(5)
    prompts = [first] * 4 + [second] * 3 + [ids(6)] + [short] * 2  # the last group's answers: one token, none
    answers = [ids(12), ids(5), ids(1), ids(20), [], ids(7), ids(2), ids(3), ids(1), []]
    results = []
    for share in (False, True):
        model.zero_grad()
        picked, rows = answer_logps(model, prompts, answers, 0, 0.7, share_prompts=share)
        (picked * torch.linspace(-1, 1, len(picked))).sum().backward()
        results.append((picked.detach(), rows, [p.grad.clone() for p in model.parameters()]))
    (a, rows_a, grads_a), (b, rows_b, grads_b) = results
    assert len(a) == sum(map(len, answers)) and torch.equal(rows_a, rows_b)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert all((x - y).abs().max() <= 1e-5 * x.abs().max() for x, y in zip(grads_a, grads_b, strict=True))
    prefix, rest = model.shared_prefix_states(torch.tensor(first), torch.tensor([ids(8), ids(8)]))
    assert prefix.shape == (9, 64) and rest.shape == (2, 8, 64)
    with pytest.raises(ValueError, match="exceeds the context of 48"):
        model.shared_prefix_states(torch.tensor(ids(40)), torch.tensor([ids(9)]))
