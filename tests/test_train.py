import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from clearlm.errors import ArtifactError
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.pipeline import Pipeline, Reporter
from clearlm.recipe import TrainConfig, load_recipe
from clearlm.train.checkpoint import _write_checksums, load_checkpoint, save_checkpoint
from clearlm.train.loop import accumulate_gradients
from clearlm.train.optim import build_optimizer, lr_at, newton_schulz, set_lr


def test_wsd_schedule_warms_up_holds_then_decays_linearly_over_its_fraction():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=2.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([0.2 * (i + 1) for i in range(10)])
    assert lrs[10:80] == [2.0] * 70, "stable until the last 20 steps"
    assert lrs[80:] == pytest.approx([2.0 * (1 - (i + 1) / 20) for i in range(20)])
    assert lrs[-1] == 0.0


def test_muon_update_is_orthogonalised_and_adamw_takes_the_rest():
    torch.manual_seed(0)
    g = torch.randn(48, 96) @ torch.diag(torch.logspace(-2, 1, 96))  # condition number ~100
    x = newton_schulz(g)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.65 and s.max() < 1.25, "every direction moves by about the same amount"
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    assert torch.linalg.norm(x - polar) / torch.linalg.norm(polar) < 0.3
    assert newton_schulz(g.T).allclose(x.T, atol=1e-5), "tall matrices are handled by transposing"
    model = Transformer(TransformerConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, context=8))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.05, lr=1e-3))
    muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {f"layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    weight = model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    set_lr(opt, 1.0)
    opt.step()
    update = (before * (1 - 0.05 * 0.1) - weight.detach()) / 0.05  # the decayed weight minus the step
    scale = max(1.0, weight.shape[0] / weight.shape[1]) ** 0.5
    assert torch.linalg.svdvals(update / scale).max() < 1.25


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def _losses(train_dir):
    return [r["loss"] for r in map(json.loads, (train_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


class StepRecorder(Reporter):
    def __init__(self):
        self.steps, self.notes = [], []

    def train_step(self, record):
        self.steps.append(record["step"])

    def note(self, message):
        self.notes.append(message)


MUON_OLMO2 = ['train.optimizer="muon"', 'train.schedule="wsd"', 'model.architecture="olmo2"', "train.z_loss=1e-4"]


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "overrides"), [(4, []), (5, []), (5, MUON_OLMO2)])
def test_resume_is_bit_identical(tmp_path, tiny_recipe, stop, overrides):
    straight = Pipeline(load_recipe(tiny_recipe, overrides), tmp_path / "a").run("train")
    interrupted = Pipeline(load_recipe(tiny_recipe, overrides), tmp_path / "b")
    assert interrupted.run("train", stop_after=stop) is None
    partial_log = (interrupted.store.partial_path("train", straight.digest) / "log.jsonl").read_text()
    rec = StepRecorder()
    resumed = Pipeline(load_recipe(tiny_recipe, overrides), tmp_path / "b", rec).run("train", resume=True)
    assert rec.steps == list(range(stop + 1, 9)), "resume must continue, not start over"
    assert rec.notes == [f"train: resuming from step-{stop:07d}"]
    assert (resumed.path / "log.jsonl").read_text().startswith(partial_log), "the first part of the log is kept"
    assert resumed.digest == straight.digest
    assert _losses(resumed.path) == _losses(straight.path)
    assert len(_losses(straight.path)) == 8
    a, b = load_file(straight.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(straight.manifest["outputs"]) == set(resumed.manifest["outputs"]), "same checkpoints, same files"


@pytest.mark.slow
def test_without_resume_a_partial_run_starts_over(tmp_path, tiny_recipe):
    pipe = Pipeline(load_recipe(tiny_recipe), tmp_path / "c")
    assert pipe.run("train", stop_after=4) is None
    rec = StepRecorder()
    Pipeline(load_recipe(tiny_recipe), tmp_path / "c", rec).run("train")
    assert rec.steps == list(range(9))
    assert rec.notes == ["train: discarding an interrupted run at step-0000004 (pass --resume to continue it)"]


def test_accumulated_gradients_weigh_micro_batches_by_tokens():
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, context=8)
    torch.manual_seed(0)
    batch = torch.randint(0, 50, (4, 9))
    grads = []
    for micro in ([batch], [batch[:1], batch[1:]]):  # unequal micro-batches: 1 row and 3 rows
        model = Transformer(cfg)
        model.init_weights(0)
        loss, _ = accumulate_gradients(model, micro)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_training_log_and_checkpoints(tiny_run):
    art = tiny_run.artifacts["train"]
    records = [json.loads(line) for line in (art.path / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_loss" in records[0]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens", "mfu"} <= records[1].keys()
    assert sorted(p.name for p in (art.path / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert not (art.path / "checkpoints" / "step-0000004" / "optimizer").exists()
    assert (art.path / "checkpoints" / "step-0000008" / "optimizer").exists()
    assert art.metrics["val_loss"] < art.metrics["initial_val_loss"]


class _CountingSGD(torch.optim.SGD):
    """SGD that also keeps a plain-number count per parameter, as some optimizers keep their step."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1
        return super().step(closure)


def test_checkpoint_round_trips_optimizer_state_that_is_a_plain_number(tmp_path):
    def setup() -> tuple[Transformer, torch.optim.Optimizer]:
        model = Transformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, context=8))
        model.init_weights(0)
        return model, _CountingSGD(model.parameters(), lr=0.1, momentum=0.9)

    model, opt = setup()
    for _ in range(3):
        accumulate_gradients(model, [torch.randint(0, 32, (2, 9))])
        opt.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, 3, model, opt, {"position": 0}, keep_optimizer=True)
    again, opt_again = setup()
    load_checkpoint(path, again, opt_again)
    ours, theirs = opt.state_dict()["state"], opt_again.state_dict()["state"]
    assert [int(s["count"]) for s in theirs.values()] == [3] * len(ours)
    for key in ours:
        torch.testing.assert_close(theirs[key]["momentum_buffer"], ours[key]["momentum_buffer"], rtol=0, atol=0)


def test_checkpoint_resumes_when_a_parameter_never_had_a_gradient(tmp_path):
    def setup() -> tuple[Transformer, torch.optim.Optimizer]:
        model = Transformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, context=8))
        model.init_weights(0)
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # in no forward, so no state
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, opt = setup()
    for _ in range(2):
        accumulate_gradients(model, [torch.randint(0, 32, (2, 9))])
        opt.step()
        opt.zero_grad()
    assert model.unused not in opt.state
    path = save_checkpoint(tmp_path, 2, model, opt, {"position": 0}, keep_optimizer=True)
    again, opt_again = setup()
    load_checkpoint(path, again, opt_again)
    assert again.unused not in opt_again.state, "no state is invented for it: the run continues as it would have"
    ours, theirs = opt.state_dict()["state"], opt_again.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        for name in ours[key]:
            torch.testing.assert_close(theirs[key][name], ours[key][name], rtol=0, atol=0)

    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "optimizer_state_of": [*state["optimizer_state_of"], "x"]}))
    with pytest.raises(ArtifactError, match=r"state\.json: its bytes differ from the sha256 in checksums\.json"):
        load_checkpoint(path, *setup())  # an edited file is caught by its checksum first
    _write_checksums(path)  # a consistent checkpoint of another model: caught by what it lists
    with pytest.raises(ArtifactError, match=r"state\.json: optimizer state of a parameter this model lacks: x"):
        load_checkpoint(path, *setup())
    (path / "state.json").write_text(json.dumps(state))
    for shard in (path / "optimizer").glob("*.safetensors"):
        shard.unlink()  # state that was saved and is lost must not become an empty state silently
    with pytest.raises(ArtifactError, match=r"optimizer/.*: missing, though checksums\.json lists it"):
        load_checkpoint(path, *setup())
    _write_checksums(path)
    with pytest.raises(ArtifactError, match=r"optimizer: \d+ optimizer tensors are missing \(first: embed_tokens"):
        load_checkpoint(path, *setup())
