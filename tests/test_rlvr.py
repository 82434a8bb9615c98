"""RLVR: GRPO's advantages and losses by hand and equal to TRL's GRPOTrainer, the verifiers, and the stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import hf_chat_tokenizer, tiny_decoder

from clearlm.recipe import RLVRConfig
from clearlm.train.grpo import LossSettings, advantages, nanstd, policy_loss
from clearlm.train.loop import clip_gradients
from clearlm.train.optim import build_optimizer
from clearlm.train.posttrain import lr_at
from clearlm.train.rlvr import Rollout, fixed_logps, optimization_pass, reward_metrics, settings

NAN = math.nan


def test_advantages_equal_a_hand_computation():
    per = torch.tensor([[1.0, NAN], [0.0, 1.0], [1.0, 1.0], [0.0, NAN], [1.0, 0.0], [1.0, 0.0], [NAN, NAN], [1.0, 0.0]])
    w = torch.tensor([1.0, 0.5])
    adv = advantages(per, w, 4, "group")
    rewards = [1.0, 0.5, 1.5, 0.0, 1.0, 1.0, NAN, 1.0]
    assert adv.rewards[:6].tolist() == rewards[:6] and math.isnan(adv.rewards[6].item())
    g1 = torch.tensor(rewards[:4])
    mean1, std1 = g1.mean().item(), g1.std().item()  # Bessel's correction, as TRL's nanstd
    assert adv.advantages[:4].tolist() == pytest.approx([(r - mean1) / (std1 + 1e-4) for r in rewards[:4]])
    # the second group: the unscored completion is left out of its mean and std and gets advantage 0; the others
    # are equal, so their std is 0 and the group counts as zero-variance
    assert adv.advantages[4:].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert adv.zero_std.tolist() == [False] * 4 + [True] * 4
    none = advantages(per, w, 4, "none")
    assert none.advantages[:4].tolist() == pytest.approx([r - mean1 for r in rewards[:4]])
    batch = advantages(per, w, 4, "batch")
    whole = torch.tensor([r for r in rewards if not math.isnan(r)])
    assert batch.advantages[0].item() == pytest.approx((1.0 - mean1) / (whole.std().item() + 1e-4))
    assert nanstd(torch.tensor([1.0, NAN, 3.0])).item() == pytest.approx(math.sqrt(2.0))


def _settings(loss_type: str, beta: float = 0.0, high: float = 0.28) -> LossSettings:
    return LossSettings(loss_type, 0.2, high, beta, max_completion_length=5)


def test_each_loss_type_equals_a_hand_computation():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, 0.0]])
    old = torch.tensor([[-1.5, -2.0, -0.4], [-0.2, -1.0, 0.0]])
    ref = torch.tensor([[-1.2, -1.8, -0.6], [-0.1, -1.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    ratio = (logps - old).exp()
    per = torch.empty(2, 3)
    for i in range(2):
        for j in range(3):
            r, a = ratio[i, j].item(), adv[i].item()
            per[i, j] = -min(r * a, min(max(r, 0.8), 1.28) * a)
    kl = ((ref - logps).exp() - (ref - logps) - 1) * ratio  # TRL's bias-corrected KL (its default)
    for beta in (0.0, 0.1):
        tokens = (per + beta * kl) * mask
        expected = {
            "grpo": ((tokens[0].sum() / 3 + tokens[1].sum() / 2) / 2).item() / 2,
            "bnpo": (tokens.sum() / 5).item() / 2,
            "dr_grpo": (tokens.sum() / (2 * 5)).item() / 2,
            "dapo": (tokens.sum() / 11).item(),
        }
        for loss_type, value in expected.items():
            loss, metrics = policy_loss(logps, old, ref, adv, mask, _settings(loss_type, beta), micro_batches=2,
                                        batch_tokens=11.0)  # fmt: skip
            assert loss.item() == pytest.approx(value, rel=1e-6), (loss_type, beta)
    # clipped: row 0 (advantage > 0) where the ratio passes 1.28; row 1 (< 0) where it falls below 0.8
    high = ((ratio > 1.28) & (adv[:, None] > 0)).float()
    low = ((ratio < 0.8) & (adv[:, None] < 0)).float()
    assert metrics["clip_ratio/high_mean"] == pytest.approx(((high * mask).sum() / 5).item())
    assert metrics["clip_ratio/low_mean"] == pytest.approx(((low * mask).sum() / 5).item())
    assert metrics["kl"] == pytest.approx(((kl * mask).sum() / 5).item())
    assert metrics["clip_ratio/high_mean"] > 0 and metrics["clip_ratio/low_mean"] > 0


# -- equality with TRL's GRPOTrainer on the same model, prompts, completions and rewards ---------------------------

PROMPTS = ["What color is the sky?", "Name a prime."]
COMPLETIONS = {  # four per prompt (a group), of different lengths; some end with the end-of-text token
    PROMPTS[0]: ["It is blue.", "Green.", "It is blue, like the sea", "Why?"],
    PROMPTS[1]: ["Seven.", "Nine, a prime.", "Two", "the quick brown fox jumps over it"],
}
ENDED = {"Green.", "Why?", "Seven.", "Two"}  # these end with the end-of-text token
CORRECT = {"It is blue.": 1.0, "It is blue, like the sea": 0.5, "Seven.": 1.0, "Two": 1.0, "Green.": 0.0}
LENGTH = {"Why?": None}  # the second verifier does not apply to it


def _correct(prompts, completions, **kw):
    return [CORRECT.get(c, 0.0) for c in completions]


def _short(prompts, completions, **kw):
    return [LENGTH[c] if c in LENGTH else float(len(c) < 12) for c in completions]


def _trl_run(tmp_path, chat_tok, cfg: RLVRConfig, steps: int) -> tuple[list[dict], dict]:
    """TRL's trainer over fixed completions (its `rollout_func`): the log of each step, and the tokens it scored."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from clearlm.model.hf import save_hf

    eos, pad = chat_tok.token_to_id("<|endoftext|>"), chat_tok.token_to_id("<|pad|>")
    save_hf(tiny_decoder(chat_tok.get_vocab_size()), tmp_path / "model", bos_id=eos, eos_id=eos, pad_id=pad)
    hf_tok = hf_chat_tokenizer(chat_tok)
    hf_tok.save_pretrained(tmp_path / "model")
    scored: dict[str, list[list[int]]] = {}

    def rollout(prompts, trainer):
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for p in prompts:
            k = seen[p] = seen.get(p, -1) + 1
            text = COMPLETIONS[p][k]
            ids = chat_tok.encode(text, add_special_tokens=False).ids + ([eos] if text in ENDED else [])
            prompt_ids.append(chat_tok.encode(p, add_special_tokens=False).ids)
            completion_ids.append(ids)
        scored["prompts"], scored["completions"] = prompt_ids, completion_ids
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids]}  # fmt: skip

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to=[], save_strategy="no", max_steps=steps, logging_steps=1, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=4,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, learning_rate=cfg.lr,
        loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        num_iterations=cfg.num_iterations, scale_rewards=cfg.scale_rewards, reward_weights=[1.0, 0.5],
        shuffle_dataset=False, max_grad_norm=cfg.grad_clip, weight_decay=cfg.weight_decay,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(model=str(tmp_path / "model"), reward_funcs=[_correct, _short], args=args,
                              train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=hf_tok, rollout_func=rollout)  # fmt: skip
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], scored


def _clearlm_run(chat_tok, cfg: RLVRConfig, scored: dict, steps: int) -> list[dict]:
    """clearlm's optimization passes over the same completions, rewards and model."""
    pad = chat_tok.token_to_id("<|pad|>")
    model = tiny_decoder(chat_tok.get_vocab_size())
    opt = build_optimizer(model, cfg)
    texts = [chat_tok.decode(ids, skip_special_tokens=True) for ids in scored["completions"]]
    rewards = [[a, b] for a, b in zip(_correct([], texts), _short([], texts), strict=True)]
    per_verifier = torch.tensor([[NAN if v is None else v for v in row] for row in rewards])
    reference = tiny_decoder(chat_tok.get_vocab_size()).eval()
    log = []
    for batch in range(steps // cfg.num_iterations):
        rollout = Rollout(scored["prompts"], scored["completions"],
                          advantages(per_verifier, torch.tensor([1.0, 0.5]), 4, cfg.scale_rewards))  # fmt: skip
        if cfg.num_iterations > 1:
            rollout.old = fixed_logps(model, rollout, 8, cfg.temperature, pad)
        if cfg.beta:
            rollout.ref = fixed_logps(reference, rollout, 8, cfg.temperature, pad)
        generation = reward_metrics(rollout.adv, per_verifier, ["_correct", "_short"])
        for iteration in range(cfg.num_iterations):
            step = batch * cfg.num_iterations + iteration
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, cfg)
            metrics = optimization_pass(model, rollout, settings(cfg), 8, cfg.temperature, pad)
            clip_gradients(model, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.append({**metrics, **(generation if iteration == 0 else {})})
    return log


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize(("beta", "num_iterations"), [(0.0, 1), (0.04, 2)])
def test_loss_kl_clipping_and_rewards_equal_trl(chat_tok, tmp_path, loss_type, beta, num_iterations):
    """Four optimizer steps; with two passes per generation batch the second pass's policy ratio moves from 1 and
    is clipped (narrow clipping, epsilon_high for DAPO's asymmetric clipping). TRL's defaults otherwise, the bias-
    corrected KL included."""
    cfg = RLVRConfig(data=[{"path": "x.jsonl"}], verifiers=[{"name": "python_parses"}], loss_type=loss_type,
                     beta=beta, num_iterations=num_iterations, lr=5e-3, temperature=0.7, max_completion_length=12,
                     epsilon=0.05, epsilon_high=0.08 if loss_type == "dapo" else None, max_steps=4)  # fmt: skip
    theirs, scored = _trl_run(tmp_path, chat_tok, cfg, 4)
    ours = _clearlm_run(chat_tok, cfg, scored, 4)
    assert len(theirs) == len(ours) == 4
    keys = [
        "loss",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/_correct/mean",
        "rewards/_short/mean",
        "rewards/_correct/std",
    ]
    keys += ["kl"] if beta else []
    for step, (t, o) in enumerate(zip(theirs, ours, strict=True)):
        for key in keys:
            if key in o or key in t:
                assert o[key] == pytest.approx(t[key], abs=1e-5), (step, key)
    if num_iterations > 1:
        assert any(o["clip_ratio/region_mean"] > 0 for o in ours)


# -- verifiers ------------------------------------------------------------------------------------------------------


def test_answer_verifier_on_right_wrong_and_malformed_answers():
    from clearlm.verifiers.answer import verify

    rows = [{"answer": "He pays 3 * 4 = 12.\n#### 1,200"}] * 4 + [{"answer": 42}, {"answer": "Paris"}, {}]
    completions = ["So the total is $1200.", "#### 1,200", "The answer is 12", "no number at all", "x = 41 then 42.",
                   "The capital is paris", "anything"]  # fmt: skip
    assert verify(completions, rows) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, None]


def test_code_verifier_runs_the_tests_in_the_sandbox_and_contains_hostile_code():
    from clearlm.verifiers.code_tests import verify

    tests = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # right, in a fence
        "def add(a, b):\n    return a - b",  # wrong
        "def add(a, b):\n    while True:\n        pass\nadd(1, 2)",  # hangs: stopped at the time limit
        "import os\nos.system('touch /tmp/escaped-by-rlvr-test')\ndef add(a, b):\n    return a + b\n"
        "open('/tmp/escaped-by-rlvr-test-2', 'w')",  # writes outside its directory: blocked
        "def add(a, b:",  # does not parse
        "def add(a, b):\n    return a + b",  # no tests in its row
    ]
    import clearlm.verifiers.code_tests as code_tests

    code_tests.TIMEOUT_SECONDS = 2.0
    rows = [tests] * 5 + [{}]
    assert verify(completions, rows) == [1.0, 0.0, 0.0, 0.0, 0.0, None]
    assert not Path("/tmp/escaped-by-rlvr-test-2").exists()


def test_python_verifiers_and_a_user_function(tmp_path):
    from clearlm.verifiers import load, score

    mine = "def long_enough(prompts, completions, minimum, **kw):\n    return [float(len(c) >= m) for c, m in "
    (tmp_path / "mine.py").write_text(mine + "zip(completions, minimum)]\n")
    (tmp_path / "broken.py").write_text("def boom(prompts, completions, **kw):\n    raise RuntimeError('no')\n")
    verifiers = [
        load("python_parses", 1.0, None, tmp_path),
        load("python_function", 1.0, None, tmp_path),
        load("user", 0.5, "mine.py:long_enough", tmp_path),
        load("user", 1.0, "broken.py:boom", tmp_path),
    ]
    completions = ["def f(x):\n    return x", "def g(x):\n    return x", "def f(x:", "```py\nf = 1\n```"]
    rows = [{"prompt": "p", "entry_point": "f", "minimum": 5}] * 3 + [{"prompt": "p", "minimum": 50}]
    per, errors = score(verifiers, completions, rows)
    shown = [[None if math.isnan(v) else v for v in row] for row in per]
    assert shown == [[1.0, 1.0, 1.0, None], [1.0, 0.0, 1.0, None], [0.0, 0.0, 1.0, None], [1.0, None, 0.0, None]]
    assert errors == {"user:broken.py:boom: RuntimeError: no": 4}
    with pytest.raises(ValueError, match="unknown verifier 'exact'"):
        RLVRConfig(builtin="stdlib-functions", verifiers=[{"name": "exact"}])
    with pytest.raises(ValueError, match="function is given exactly when"):
        RLVRConfig(builtin="stdlib-functions", verifiers=[{"name": "user"}])


def test_ifeval_verifier_scores_the_share_of_instructions_followed():
    from clearlm.verifiers.ifeval import verify

    ids = ["change_case:english_lowercase", "punctuation:no_comma"]
    row = {"prompt": "Write about cats.", "instruction_id_list": ids, "kwargs": [{}, {}]}
    assert verify(["cats are nice and soft.", "Cats, nice.", "CATS ARE NICE"], [row] * 3) == [1.0, 0.0, 0.5]
    assert verify(["anything"], [{"prompt": "x"}]) == [None]


def test_bad_prompt_rows_are_named(tmp_path):
    from clearlm.data.chat import BadRow
    from clearlm.data.prompts import read_prompts

    path = tmp_path / "p.jsonl"
    rows = ['{"prompt": "ok", "answer": "1"}', "{not json", '{"answer": 1}', '{"prompt": "  "}',
            '{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}']  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    got = list(read_prompts(path))
    assert got[0] == (f"{path}:1", {"prompt": "ok", "answer": "1"})
    assert [str(r) for _, r in got[1:]] == ["invalid JSON (Expecting property name enclosed in double quotes)",
                                             "no prompt field", "empty prompt", "prompt: the last message must be "
                                             "the user's (the completion is the assistant's reply)"]  # fmt: skip
    assert all(isinstance(r, BadRow) for _, r in got[1:]) and got[2][0] == f"{path}:3"


# -- the stage ------------------------------------------------------------------------------------------------------


def write_rlvr_recipe(folder: Path) -> Path:
    """The tiny corpus pretrained, SFT on "Say X." chats, then RLVR on the same requests rewarded by a user verifier
    (the word said, and length) and `python_parses`, two passes per generation batch, a KL penalty and checkpoints."""
    import json

    from conftest import WORDS, write_tiny_recipe

    recipe = write_tiny_recipe(folder, steps=10)
    chats = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in WORDS * 3]  # fmt: skip
    (folder / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prompts = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "word": w} for w in WORDS * 2]
    prompts.append({"prompt": "Say " + "very " * 80 + "much."})  # longer than the context allows: dropped, counted
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts) + "not json\n")
    # the word said, plus a little for length: groups of random completions then differ in reward, so GRPO moves
    says = "    return [None if w is None else float(w in c) + len(c) / 100 for c, w in zip(completions, word)]\n"
    (folder / "reward.py").write_text("def says(prompts, completions, word, **kw):\n" + says)
    text = recipe.read_text().replace("context = 32", "context = 64")
    text += '\n[sft]\ndata = [{ path = "chat.jsonl", license = "CC0-1.0" }]\nepochs = 1\nmicro_batch_size = 16\n'
    text += ('\n[rlvr]\nbase = "sft"\ndata = [{ path = "prompts.jsonl", license = "CC0-1.0" }]\nmax_steps = 6\n'
             "num_iterations = 2\nnum_generations = 4\nprompts_per_step = 2\nmicro_batch_size = 3\n"
             "max_completion_length = 12\nbeta = 0.04\nlr = 1e-3\ncheckpoint_interval = 2\nheld_out_fraction = 0.2\n"
             '[[rlvr.verifiers]]\nname = "python_parses"\nweight = 0.5\n'
             '[[rlvr.verifiers]]\nname = "user"\nfunction = "reward.py:says"\n')  # fmt: skip
    recipe.write_text(text)
    return recipe


@pytest.mark.slow
def test_the_stage_resumes_exactly_keeps_every_completion_and_is_released(tmp_path):
    import json

    from clearlm.pipeline import Pipeline
    from clearlm.recipe import load_recipe
    from clearlm.release.compare import jsonl

    recipe = load_recipe(str(write_rlvr_recipe(tmp_path)))
    whole = Pipeline(recipe, tmp_path / "whole").run("rlvr")
    assert Pipeline(recipe, tmp_path / "parts").run("rlvr", stop_after=3) is None  # rounded up to a batch's end
    parts = Pipeline(recipe, tmp_path / "parts").run("rlvr", resume=True)
    for name in ("completions.jsonl", "model.safetensors", "held_out_before.json"):
        assert (whole.path / name).read_bytes() == (parts.path / name).read_bytes(), name
    assert jsonl(whole.path / "log.jsonl") == jsonl(parts.path / "log.jsonl")
    m = whole.metrics
    from conftest import WORDS

    too_long = "dropped: prompt longer than the context less max_completion_length"
    assert m["counts"] == {"prompts": 2 * len(WORDS), too_long: 1}
    assert m["bad_rows"] == {"invalid JSON (Expecting value)": 1} and m["steps"] == 6
    log = jsonl(whole.path / "log.jsonl")
    assert [r["iteration"] for r in log] == [1, 2] * 3 and all(r["kl"] >= 0 for r in log)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and max(r["kl"] for r in log) > 0  # moved off the start
    rows = [json.loads(line) for line in (whole.path / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 4 and {r["step"] for r in rows} == {1, 3, 5}
    row = rows[0]
    assert set(row) == {"step", "prompt", "gold", "completion", "finish", "rewards", "reward", "advantage"}
    assert set(row["rewards"]) == {"python_parses", "user:reward.py:says"} and "word" in row["gold"]
    expected = 0.5 * row["rewards"]["python_parses"] + row["rewards"]["user:reward.py:says"]
    assert row["reward"] == pytest.approx(expected)
    group = [r["reward"] for r in rows[:4]]
    mean, std = sum(group) / 4, torch.tensor(group).std().item()
    assert row["advantage"] == pytest.approx((row["reward"] - mean) / (std + 1e-4), abs=1e-5)
    release = Pipeline(recipe, tmp_path / "whole").run("release").path
    assert (release / "post_training" / "rlvr_completions.jsonl").read_bytes() == (
        whole.path / "completions.jsonl").read_bytes()  # fmt: skip
    card = (release / "README.md").read_text()
    assert "## Reinforcement learning with verifiable rewards" in card and "held-out prompts" in card
    assert "Reinforcement learning with verifiable rewards" in (release / "report.html").read_text()
    assert "rlvr" in json.loads((release / "lineage.json").read_text())
    assert (release / "code" / "verifiers" / "reward.py").read_text() == (tmp_path / "reward.py").read_text()
    assert (release / "data" / "post_training" / "rlvr" / "prompts.jsonl.zst").is_file()
    assert f"- rlvr: {m['prompts']} prompts trained on" in (release / "data" / "data_card.md").read_text()
    from clearlm.release.verify import verify_release

    verified = verify_release(release, tmp_path, tmp_path)  # re-runs every stage, RLVR's too
    assert verified.reproduced and "rlvr" in " ".join(verified.lines), verified.lines
