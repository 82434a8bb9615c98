"""End-to-end: the tiny recipe through every stage, the cache, the release and the CLI."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_outside_llama
from safetensors.torch import load_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

import clearlm
from clearlm.artifacts import integrity, sha256_file
from clearlm.cli import app
from clearlm.data.chat import ChatTemplate, tokenize_sft
from clearlm.data.instructions import stdlib_function_examples
from clearlm.model.generate import Sampling, complete
from clearlm.model.transformer import Transformer, TransformerConfig
from clearlm.model.weights import load_model
from clearlm.openness.audit import audit_folder
from clearlm.openness.mof import evaluate, from_mot, validate_mot
from clearlm.pipeline import Pipeline, Reporter
from clearlm.recipe import load_recipe
from clearlm.release.load import load_release
from clearlm.release.verify import verify_release

pytestmark = pytest.mark.slow
runner = CliRunner()


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def stage_skipped(self, kind, artifact):
        self.events.append(("skip", kind))

    def stage_finished(self, kind, artifact):
        self.events.append(("built", kind))


def test_release_folder_is_complete_and_traceable(tiny_run):
    rel = tiny_run.artifacts["release"].path
    expected = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                "recipe.toml", "training/log.jsonl", "eval/results.json", "lineage.json", "manifest.json",
                "checkpoints/step-0000004/model.safetensors", "data/data_card.json", "data/data_card.md",
                "data/lengths.png", "generation_config.json"]  # fmt: skip
    for name in expected:
        assert (rel / name).is_file(), name
    manifest = json.loads((rel / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"data", "tokenizer", "shards", "train", "eval"}
    lineage = json.loads((rel / "lineage.json").read_text())
    assert {k: v["digest"] for k, v in lineage.items()} == {k: v["digest"] for k, v in manifest["inputs"].items()}
    assert integrity(tiny_run.artifacts["release"].path) == []
    card = (rel / "README.md").read_text()
    assert card.startswith('---\nlicense: "cdla-permissive-2.0"')
    all_bpb = tiny_run.artifacts["eval"].metrics["bits_per_byte"]["all"]["bits_per_byte"]
    assert f"| all | {all_bpb:.4f} |" in card
    assert "**Class I - Open Science Model**" in card


def test_default_release_is_class_one_and_osaid_complete(tiny_run):
    rel = tiny_run.artifacts["release"].path
    report = json.loads((rel / "openness.json").read_text())
    assert report["mof"]["class"] == 1 and report["mof"]["reasons"] == []
    assert report["osaid"]["complete"]
    rows = {r["component"]: r for r in report["components"]}
    assert all(r["present"] for r in rows.values()), [n for n, r in rows.items() if not r["present"]]
    assert rows["Model parameters (Final)"]["license"] == "CDLA-Permissive-2.0" and rows["Datasets"]["right_type"]
    assert {n for n, r in rows.items() if r["generated"]} == {"Model card", "Data card", "Technical report",
                                                               "Research paper"}  # fmt: skip
    for row in rows.values():
        for path in row["paths"]:
            assert (rel / path).exists(), (row["component"], path)
    mot = yaml.safe_load((rel / "mot.yml").read_text())
    assert evaluate(*from_mot(mot)).mof_class == 1, "the exported MOT file gives the same class"
    assert validate_mot(mot) == []
    code = rel / "code" / "clearlm"
    assert (code / "model" / "transformer.py").read_bytes() == Path(clearlm.__file__).parent.joinpath(
        "model", "transformer.py"
    ).read_bytes()
    html = (rel / "report.html").read_text()
    assert html.count("<svg") >= 6 and "Class I - Open Science Model" in html and "http" not in html.split("<body>")[0]
    generations = [json.loads(line) for line in (rel / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 3 and all(g["completion"] for g in generations)
    data_card = json.loads((rel / "data" / "data_card.json").read_text())
    shards = tiny_run.artifacts["shards"].metrics
    assert sum(n["tokens"] for n in data_card["tokens"]["train"].values()) == shards["train"]["tokens"] > 0
    assert "## Tokens" in (rel / "data" / "data_card.md").read_text()
    link = tiny_run.workdir / "tiny" / "release"
    assert link.is_symlink() and link.resolve() == rel.resolve()
    assert load_recipe(rel / "recipe.toml").recipe.model_dump(exclude={"data"}) == tiny_run.recipe.model_dump(
        exclude={"data"}
    )


def test_release_loads_in_transformers_with_identical_logits(tiny_run):
    transformers = pytest.importorskip("transformers")
    rel = tiny_run.artifacts["release"].path
    hf = transformers.AutoModelForCausalLM.from_pretrained(rel).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(rel)
    model, tok, eos = load_release(rel)
    text = "def value(self):\n    return data"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text).ids
    assert hf_tok.eos_token_id == eos == 0
    with torch.no_grad():
        diff = (hf(torch.tensor([ids])).logits - model(torch.tensor([ids]))).abs().max().item()
    assert diff < 1e-4


def test_eval_reports_bits_per_byte_per_domain(tiny_run):
    metrics = tiny_run.artifacts["eval"].metrics
    assert set(metrics["bits_per_byte"]) == {"code", "prose", "all"}
    for domain, m in metrics["bits_per_byte"].items():
        assert 0 < m["bits_per_byte"] < metrics["untrained_bits_per_byte"][domain]["bits_per_byte"]


def test_the_recipe_eval_and_clearlm_eval_on_the_release_are_one_scoring_path(tiny_run):
    from clearlm.eval.run import EvalRequest, evaluate_model

    validation = tiny_run.artifacts["data"].path / "validation.jsonl"
    release = tiny_run.artifacts["release"].path
    results, _, _ = evaluate_model(EvalRequest(release, bpb_files=[validation], batch_size=4))
    assert results["bpb:validation.jsonl"] == tiny_run.artifacts["eval"].metrics["bits_per_byte"]


def test_rerun_skips_everything_and_a_changed_setting_reruns_downstream(tmp_path, tiny_recipe):
    rec = Recorder()
    Pipeline(load_recipe(tiny_recipe), tmp_path, rec).run()
    assert rec.events == [("built", k) for k in ("data", "tokenizer", "shards", "train", "eval", "release")]
    rec.events.clear()
    Pipeline(load_recipe(tiny_recipe, ["data.workers=2"]), tmp_path, rec).run()
    assert {e[0] for e in rec.events} == {"skip"}, "how many workers clean the data does not change it"
    rec.events.clear()
    Pipeline(load_recipe(tiny_recipe, ["train.max_steps=6"]), tmp_path, rec).run()
    built = [k for e, k in rec.events if e == "built"]
    assert built == ["train", "eval", "release"]
    rec.events.clear()
    Pipeline(load_recipe(tiny_recipe, ["tokenizer.vocab_size=310"]), tmp_path, rec).run()
    assert [k for e, k in rec.events if e == "built"] == ["tokenizer", "shards", "train", "eval", "release"]


def test_edited_source_file_reruns_the_data_stage(tmp_path, tiny_recipe):
    rec = Recorder()
    Pipeline(load_recipe(tiny_recipe), tmp_path, rec).run("data")
    corpus = tiny_recipe.parent / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"id": "new", "text": "more text"}) + "\n")
    Pipeline(load_recipe(tiny_recipe), tmp_path, rec).run("data")
    assert rec.events == [("built", "data"), ("built", "data")]


def test_cli_run_generate_and_skip(tmp_path, tiny_recipe):
    workdir = str(tmp_path / "w")
    result = runner.invoke(app, ["run", str(tiny_recipe), "--workdir", workdir, "--set", "train.max_steps=4"])
    assert result.exit_code == 0, result.output
    assert "bits per byte" in result.output
    again = runner.invoke(app, ["run", str(tiny_recipe), "--workdir", workdir, "--set", "train.max_steps=4"])
    assert again.output.count("up to date, skipped") == 6
    out = runner.invoke(app, ["generate", f"{workdir}/tiny/release", "def", "--max-new-tokens", "5", "--seed", "1"])
    model, tok, eos = load_release(tmp_path / "w" / "tiny" / "release")
    expected = complete(model, tok, "def", max_new_tokens=5, sampling=Sampling(0.8, 50, seed=1), eos_id=eos)
    assert out.exit_code == 0 and out.stdout == "def" + expected + "\n"


def test_cli_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[data]\nbuiltin = "cpython-stdlib"\n[train]\nmax_stepz = 1\n')
    result = runner.invoke(app, ["run", str(bad), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}: train.max_stepz: unknown key"
    assert not (tmp_path / "w").exists()


def test_cli_bad_records_are_rejected_and_a_corrupt_file_is_a_one_line_error(tmp_path, tiny_recipe):
    corpus = tiny_recipe.parent / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + '{"text": 5}\n{not json\n')
    result = runner.invoke(app, ["data", str(tiny_recipe), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    data_dir = next((tmp_path / "w" / "artifacts").glob("data-*"))
    rejects = [json.loads(line) for line in (data_dir / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["field 'text' is missing or not a string", "invalid JSON (Expecting "
                                              "property name enclosed in double quotes)"]  # fmt: skip
    assert rejects[0]["where"].endswith("corpus.jsonl:61")
    broken = tiny_recipe.parent / "extra.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    recipe = tiny_recipe.read_text().replace(
        'sources = [{ path = "corpus.jsonl", license = "CC0-1.0" }]',
        'sources = [{ path = "corpus.jsonl", license = "CC0-1.0" }, { path = "extra.jsonl.gz" }]',
    )
    tiny_recipe.write_text(recipe)
    failed = runner.invoke(app, ["data", str(tiny_recipe), "--workdir", str(tmp_path / "w2")])
    assert failed.exit_code == 2 and "extra.jsonl.gz: cannot read" in failed.output
    left = [p for p in (tmp_path / "w2" / "artifacts").iterdir() if p.name != ".locks"]
    assert all(p.name.endswith(".partial") and not (p / "manifest.json").exists() for p in left), (
        "only a resumable .partial folder is left, never a complete-looking artifact"
    )
    skipped = runner.invoke(
        app, ["data", str(tiny_recipe), "--workdir", str(tmp_path / "w3"), "--set", "data.on_error=skip"]
    )
    assert skipped.exit_code == 0, skipped.output
    data_dir = next((tmp_path / "w3" / "artifacts").glob("data-*"))
    assert "skipped file" in (data_dir / "data_card.md").read_text()


def test_generate_on_a_folder_without_model_is_a_clear_error(tmp_path, tiny_run):
    result = runner.invoke(app, ["generate", str(tmp_path), "x"])
    assert result.exit_code == 2 and "config.json: not found" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run.artifacts["release"].path, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    result = runner.invoke(app, ["generate", str(broken), "x"])
    assert result.exit_code == 2 and "model.safetensors: its bytes differ from the sha256 in manifest" in result.output
    (broken / "manifest.json").unlink()  # an ordinary model folder: nothing to check against
    result = runner.invoke(app, ["generate", str(broken), "x"])
    assert result.exit_code == 2 and "cannot load the model" in result.output


def test_cli_too_little_data_for_one_window_is_a_clear_error(tmp_path, tiny_recipe):
    result = runner.invoke(
        app, ["train", str(tiny_recipe), "--workdir", str(tmp_path), "--set", "model.context=100000"]
    )
    assert result.exit_code == 2
    assert "fewer than one window of model.context + 1 = 100001" in result.output


def test_cli_train_stop_and_resume(tmp_path, tiny_recipe):
    args = ["train", str(tiny_recipe), "--workdir", str(tmp_path)]
    first = runner.invoke(app, [*args, "--stop-after", "4"])
    assert first.exit_code == 0 and "stopped after step 4" in first.output
    second = runner.invoke(app, [*args, "--resume"])
    assert second.exit_code == 0 and "resuming from step-0000004" in second.output


def test_help_for_every_command():
    for cmd in ("run", "data", "train", "eval", "release", "generate"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, cmd


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "clearlm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    listed = set(re.findall(r"^\W+(\w+)\s{2,}\S", proc.stdout, re.M))
    assert {"run", "data", "train", "sft", "dpo", "eval", "release", "generate", "verify", "audit"} <= listed, listed


def test_quickstart_recipe_runs_on_the_builtin_corpus_when_shrunk(tmp_path):
    """The real quickstart recipe (full stdlib corpus, both domains) with a tiny model and 3 steps. (`verify` of
    a release with every stage: tests/test_reproducibility.py, test_midtrain.py, test_stages.py.)"""
    shrink = ["tokenizer.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
              "model.context=128", "train.max_steps=3", "train.eval_batches=1", "train.checkpoint_interval=0",
              "eval.max_documents_per_domain=3", "sft.builtin_examples=40", "sft.epochs=1",
              "dpo.builtin_pairs=30", "midtrain.max_steps=2", "midtrain.warmup_steps=1"]  # fmt: skip
    pipe = Pipeline(load_recipe(None, shrink), tmp_path)
    pipe.run()
    data = pipe.artifacts["data"].metrics
    assert set(data["splits"]["validation"]) == {"cpython-stdlib/code", "cpython-stdlib/docs"}
    assert data["licenses"] == {"cpython-stdlib/code": "Python-2.0", "cpython-stdlib/docs": "Python-2.0"}
    bpb = pipe.artifacts["eval"].metrics["bits_per_byte"]
    assert set(bpb) == {"cpython-stdlib/code", "cpython-stdlib/docs", "all"}
    mix = pipe.artifacts["mid_data"].metrics["mixing"]
    assert mix["cpython-stdlib/docs"]["documents_out"] == mix["cpython-stdlib/docs"]["documents_in"] > 50
    assert 0 < mix["cpython-stdlib/code"]["documents_out"] < mix["cpython-stdlib/code"]["documents_in"] / 5
    next_line = pipe.artifacts["eval"].metrics["tasks"]["stdlib_next_line"]
    items = [json.loads(line) for line in (pipe.artifacts["eval"].path / "samples.jsonl").read_text().splitlines()]
    items = [r for r in items if r["task"] == "stdlib_next_line"]
    assert next_line["samples"] == len(items) > 20
    assert next_line["acc"] == pytest.approx(sum(r["acc"] for r in items) / len(items))
    functions = pipe.artifacts["eval"].metrics["tasks"]["stdlib_functions"]  # generated, run in the sandbox
    rows = [json.loads(line) for line in (pipe.artifacts["eval"].path / "samples.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["task"] == "stdlib_functions"]
    assert functions["samples"] == len(rows) >= 5 and all(len(r["verdicts"]["function"]) == 1 for r in rows)
    assert functions["pass@1,function"] == pytest.approx(sum(r["verdicts"]["function"] == ["passed"] for r in rows)
                                                         / len(rows))  # fmt: skip
    card = (tmp_path / "quickstart" / "release" / "README.md").read_text()
    assert "stdlib_next_line" in card and "pass@1,function" in card
    assert (tmp_path / "quickstart" / "release" / "eval" / "samples.jsonl").is_file()
    assert "stdlib_functions: generations" in (tmp_path / "quickstart" / "release" / "report.html").read_text()
    assert (tmp_path / "quickstart" / "release" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "quickstart" / "release" / "openness.json").read_text())["mof"]["class"] == 1
    index = json.loads((tmp_path / "quickstart" / "release" / "trace" / "index.json").read_text())
    assert list(index["stages"]) == ["pretraining", "mid-training", "SFT", "DPO", "RL prompts"]
    sft = pipe.artifacts["sft"].path  # the built-in set's rows: provenance `stdlib-functions:N`, tokens as trained
    docs = [json.loads(line) for line in (sft / "trained.docs.jsonl").read_text().splitlines()]
    assert len(docs) == pipe.artifacts["sft"].metrics["examples"] == index["stages"]["SFT"]["documents"]
    made = stdlib_function_examples(pipe.artifacts["data"].path / "train.jsonl", 40)
    tok = Tokenizer.from_file(str(sft / "tokenizer.json"))
    for doc in docs[:3]:
        assert doc["source"] == "stdlib-functions" and doc["license"] == "Python-2.0"
        expected = tokenize_sft(tok, ChatTemplate(), made[int(doc["id"].split(":")[1]) - 1])[0][:128]
        assert np.fromfile(sft / "trained.bin", dtype="<u4")[doc["start"] : doc["end"]].tolist() == expected


def test_cli_eval_a_model_folder_on_a_task_file(tmp_path, tiny_run):
    examples = Path(__file__).resolve().parents[1] / "examples" / "tasks"
    rel = str(tiny_run.artifacts["release"].path)
    out = tmp_path / "out"
    args = ["eval", rel, "--task-file", str(examples / "capitals.toml"), "--output", str(out)]
    result = runner.invoke(app, [*args, "--task-file", str(examples / "python_keywords.toml")])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["results"]) == {"capitals", "python_keywords"}
    assert doc["results"]["capitals"]["samples"] == 8 and "acc_norm_stderr" in doc["results"]["capitals"]
    assert doc["data"]["capitals"]["sha256"].startswith("sha256:") and doc["model"]["weights"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and {"loglikelihoods", "pred", "gold"} <= rows[0].keys()
    listing = runner.invoke(app, ["eval", "--list"])
    assert "hellaswag" in listing.output and "partial" in listing.output
    missing = runner.invoke(app, ["eval", rel, "--tasks", "arc_easy", "--data-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "arc_easy_test.jsonl: data file for task 'arc_easy' not found" in missing.output


def test_cli_eval_bits_per_byte_and_preferences_on_files(tmp_path, tiny_run):
    rel = str(tiny_run.artifacts["release"].path)
    text = tmp_path / "notes"
    text.mkdir()
    (text / "a.txt").write_text("def value(self):\n    return data\n")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "def", "chosen": " value", "rejected": " zzz"}) + "\n")
    out = tmp_path / "out"
    args = ["eval", rel, "--bpb", str(text), "--preferences", str(prefs), "--reference", rel, "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["bpb:notes"]["a"]["bits_per_byte"] > 0  # one domain per text file (its stem)
    assert results["preferences:prefs.jsonl"]["samples"] == 1 and "accuracy_dpo" in results["preferences:prefs.jsonl"]
    nothing = runner.invoke(app, ["eval", rel])
    assert nothing.exit_code == 2 and "nothing to evaluate" in nothing.output


def test_verify_reproduces_a_release_and_names_what_was_tampered(tmp_path, tiny_run):
    rel = tiny_run.artifacts["release"].path
    base = tiny_run.loaded.base_dir
    result = runner.invoke(app, ["verify", str(rel), "--base-dir", str(base), "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "reproduced bit-for-bit" in result.output and "train: reproduced bit-for-bit" in result.output
    copy = tmp_path / "copy"
    shutil.copytree(rel, copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01  # one bit of the last tensor's data
    (copy / "model.safetensors").write_bytes(bytes(weights))
    (copy / "data" / "data_card.md").write_text((copy / "data" / "data_card.md").read_text() + "\nedited\n")
    tampered = runner.invoke(app, ["verify", str(copy), "--base-dir", str(base)])
    assert tampered.exit_code == 1
    assert "model.safetensors: content differs" in tampered.output and "data/data_card.md" in tampered.output


def test_verify_reports_the_first_stage_that_differs(tmp_path, tiny_run):
    rel = tmp_path / "release"
    shutil.copytree(tiny_run.artifacts["release"].path, rel)
    lineage = json.loads((rel / "lineage.json").read_text())
    lineage["train"]["outputs"]["model.safetensors"] = "sha256:" + "0" * 64  # as if trained elsewhere
    (rel / "lineage.json").write_text(json.dumps(lineage))
    manifest = json.loads((rel / "manifest.json").read_text())
    manifest["outputs"]["lineage.json"] = sha256_file(rel / "lineage.json")
    (rel / "manifest.json").write_text(json.dumps(manifest))
    verdict = verify_release(rel, tiny_run.loaded.base_dir, tmp_path)
    assert not verdict.reproduced and verdict.stage == "train" and verdict.files == ["model.safetensors"]
    assert verdict.max_weight_diff == 0.0, "the recorded hash differs but the weights re-run equal the release's"
    assert verdict.lines[-2] == "train: differs (max |Δ| 0 in the weights (model.safetensors)): model.safetensors"
    assert verdict.lines[-1].startswith("  likely cause: none of the recorded library versions")


def test_audit_of_a_release_finds_every_component_and_nothing_unsafe(tiny_run):
    report = audit_folder(tiny_run.artifacts["release"].path)
    assert report["unsafe"] == [] and report["declared_by"] == "mot.yml"
    assert report["mof"]["class"] == 1, report["mof"]["reasons"]
    assert all(report["components"][name] for name in report["mof"]["status"]), report["components"]
    assert report["osaid"]["complete"]


def _chromium() -> str | None:
    return next((c for c in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if c and Path(c).exists()),
                None)  # fmt: skip


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium package (make test installs it as root)")
def test_report_renders_in_headless_chromium_with_its_charts(tmp_path, tiny_run):
    import matplotlib.image

    report = tiny_run.artifacts["release"].path / "report.html"
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=2000", "--window-size=1200,2400"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "Uncaught" not in dom.stderr and "Page load failed" not in dom.stderr
    assert dom.stdout.count("<svg") >= 6 and dom.stdout.count("<polyline") >= 4 and "Sample generations" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200) and pixels[..., :3].std() > 0.05, "the page is not blank"


def test_a_non_commercial_weights_licence_names_what_holds_the_release_back(tmp_path, tiny_recipe):
    pipe = Pipeline(load_recipe(tiny_recipe, ["release.weights_license=CC-BY-NC-4.0"]), tmp_path)
    report = json.loads((pipe.run("release").path / "openness.json").read_text())
    assert report["mof"]["class"] == 0 and not report["osaid"]["complete"]
    assert any(r.startswith("Class III: Model parameters (Final) has licence 'CC-BY-NC-4.0'")
               for r in report["mof"]["reasons"])  # fmt: skip


def _chat_file(folder: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say {w} twice."}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta") * 3]  # fmt: skip
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_stage_trains_on_chat_data_and_reports_bad_rows(tmp_path, tiny_recipe):
    _chat_file(tiny_recipe.parent)
    sft = (
        '\n[sft]\ndata = [{ path = "chat.jsonl", license = "CC0-1.0" }]\n'
        "epochs = 3\nlr = 3e-3\nwarmup_ratio = 0.2\nmicro_batch_size = 4\npacking = true\n"
    )
    tiny_recipe.write_text(tiny_recipe.read_text() + sft)
    result = runner.invoke(app, ["sft", str(tiny_recipe), "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    art = next((tmp_path / "artifacts").glob("sft-*"))
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"tokenizer", "train"} and manifest["sources"]["data"][0]["digest"]
    metrics = manifest["metrics"]
    assert metrics["examples"] == 24 and metrics["bad_rows"] == {"messages has no assistant turn": 1}
    assert metrics["steps"] == 18 and metrics["final_loss"] < metrics["first_loss"]
    log = [json.loads(line) for line in (art / "log.jsonl").read_text().splitlines()]
    assert len(log) == 18 and log[0]["lr"] < log[1]["lr"] and log[-1]["lr"] < log[-2]["lr"], "warmup, then decay"
    assert json.loads((art / "rejects.jsonl").read_text().splitlines()[0])["where"].endswith("chat.jsonl:25")
    again = runner.invoke(app, ["sft", str(tiny_recipe), "--workdir", str(tmp_path)])
    assert again.output.count("up to date, skipped") == 5


def test_sft_from_a_hugging_face_folder_clearlm_did_not_write(tmp_path, tiny_run):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    rel = tiny_run.artifacts["release"].path
    hf = tmp_path / "hf-model"
    AutoModelForCausalLM.from_pretrained(rel).save_pretrained(hf)
    PreTrainedTokenizerFast.from_pretrained(rel).save_pretrained(hf)
    folder = tiny_run.loaded.base_dir
    _chat_file(tmp_path)
    recipe = (folder / "tiny.toml").read_text().replace('path = "corpus.jsonl"', f'path = "{folder / "corpus.jsonl"}"')
    (tmp_path / "r.toml").write_text(
        recipe + f'\n[sft]\nbase = "{hf}"\ndata = [{{ path = "chat.jsonl" }}]\nepochs = 1\n'
    )
    pipe = Pipeline(load_recipe(tmp_path / "r.toml"), tmp_path / "runs")
    art = pipe.run("sft")
    assert art.manifest["inputs"] == {} and art.manifest["sources"]["base"]
    assert art.metrics["examples"] == 24 and (art.path / "model.safetensors").is_file()
    release = pipe.run("release").path
    lineage = json.loads((release / "lineage.json").read_text())
    assert "train" not in lineage and lineage["base_model"]["digest"] == art.manifest["sources"]["base"]
    assert lineage["base_model"]["folder"] == str(hf) and lineage["base_model"]["unsafe_findings"] == 0
    report = json.loads((release / "openness.json").read_text())
    present = {row["component"] for row in report["components"] if row["present"]}
    assert "Model parameters (Final)" in present and not present & {"Datasets", "Training code"}
    assert report["mof"]["class"] == 3 and report["mof"]["label"] == "Class III - Open Model"
    assert "Class II: Training code is missing" in report["mof"]["reasons"]
    card = (release / "README.md").read_text()
    assert "## Base model" in card and f'base_model: "{hf}"' in card and "fully-open" not in card
    assert (release / "data" / "post_training" / "sft" / "chat.jsonl.zst").is_file()
    model = AutoModelForCausalLM.from_pretrained(release)
    ids = torch.tensor([[1, 5, 9, 2]])
    ours = load_model(art.path)
    assert torch.allclose(model(ids).logits, ours(ids), atol=1e-4)
    missing = verify_release(release, workdir=tmp_path)
    assert missing.stage == "inputs" and "sft inputs differ" in missing.lines[0]
    assert re.search(r'here "[^"]*chat\.jsonl: No such file or directory"', missing.lines[0]), missing.lines[0]
    verdict = verify_release(release, base_dir=tmp_path, workdir=tmp_path)
    assert verdict.reproduced, verdict.lines
    assert [line.split(":")[0] for line in verdict.lines] == ["data", "sft", "eval"]


def test_dpo_stage_after_sft_caches_reference_log_probs(tmp_path, tiny_recipe):
    _chat_file(tiny_recipe.parent)
    words = ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta")
    pairs = [{"prompt": [{"role": "user", "content": f"Say {w} twice."}], "chosen": [{"role": "assistant", "content":
              f"{w} {w}"}], "rejected": [{"role": "assistant", "content": f"{w}"}]} for w in words * 3]  # fmt: skip
    pairs.append({"prompt": "q", "chosen": "", "rejected": "b"})
    (tiny_recipe.parent / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sections = ('\n[sft]\ndata = [{ path = "chat.jsonl", license = "CC0-1.0" }]\nepochs = 2\nlr = 3e-3\n'
                '\n[dpo]\ndata = [{ path = "pairs.jsonl", license = "CC0-1.0" }]\nbeta = 0.5\nlr = 1e-3\n'
                "epochs = 2\nheld_out_fraction = 0.25\n")  # fmt: skip
    tiny_recipe.write_text(tiny_recipe.read_text() + sections)
    result = runner.invoke(app, ["dpo", str(tiny_recipe), "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    art = next((tmp_path / "artifacts").glob("dpo-*"))
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"sft"}
    metrics = manifest["metrics"]
    assert metrics["bad_rows"] == {"empty chosen or rejected answer": 1}
    held = metrics["held_out_before"]["pairs"]
    assert held > 0 and metrics["pairs"] + held == 24
    ref = load_file(art / "reference_logps.safetensors")
    assert ref["chosen"].shape == (metrics["pairs"],) and (ref["chosen"] < 0).all()
    log = [json.loads(line) for line in (art / "log.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(log[0])
    assert log[0]["rewards/chosen"] == 0.0, "the policy starts equal to the reference"
    assert metrics["final_loss"] < metrics["first_loss"]


def test_pretrain_sft_dpo_release_end_to_end(tmp_path, tiny_recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    test_dpo_stage_after_sft_caches_reference_log_probs(tmp_path / "first", tiny_recipe)  # writes the data files
    pipe = Pipeline(load_recipe(tiny_recipe), tmp_path / "runs")
    rel = pipe.run("release").path
    assert set(pipe.artifacts["release"].manifest["inputs"]) >= {"sft", "dpo"}
    assert pipe.artifacts["eval"].manifest["inputs"].keys() >= {"dpo"}, "the released model is the one evaluated"
    released = load_release(rel)[0]
    dpo_weights = load_file(pipe.artifacts["dpo"].path / "model.safetensors")
    assert torch.equal(released.state_dict()["layers.0.mlp.up_proj.weight"], dpo_weights["layers.0.mlp.up_proj.weight"])
    messages = [{"role": "user", "content": "Say alpha twice."}]
    hf_tok = AutoTokenizer.from_pretrained(rel)
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    text, _ = ChatTemplate().render(messages, add_generation_prompt=True)
    assert list(ids) == load_release(rel)[1].encode(text, add_special_tokens=False).ids
    hf_logits = AutoModelForCausalLM.from_pretrained(rel)(torch.tensor([ids])).logits
    assert (hf_logits - released(torch.tensor([ids]))).abs().max() < 1e-4
    card = (rel / "README.md").read_text()
    assert "## Post-training" in card and "Preference accuracy on" in card
    data_card = (rel / "data" / "data_card.md").read_text()
    assert "## Post-training data" in data_card and "| dpo | pairs.jsonl | CC0-1.0 |" in data_card
    assert (rel / "post_training" / "sft_log.jsonl").is_file() and (rel / "post_training" / "dpo_log.jsonl").is_file()
    assert json.loads((rel / "openness.json").read_text())["mof"]["class"] == 1, "post-training data licensed CC0"
    chat = runner.invoke(app, ["generate", str(rel), "Say alpha twice.", "--chat", "--max-new-tokens", "8"])
    model, tok, eos = load_release(rel)
    text, _ = ChatTemplate(eos_token="<|endoftext|>").render([{"role": "user", "content": "Say alpha twice."}],
                                                            add_generation_prompt=True)  # fmt: skip
    expected = complete(model, tok, text, max_new_tokens=8, sampling=Sampling(0.8, 50, seed=0), eos_id=eos)
    assert chat.exit_code == 0 and chat.output == expected + "\n"
    assert (rel / "data" / "post_training" / "dpo" / "pairs.jsonl.zst").is_file()
    assert "Preference tuning (DPO): reward accuracy and margin" in (rel / "report.html").read_text()
    verdict = verify_release(rel, tiny_recipe.parent, tmp_path)
    assert verdict.reproduced and any(line.startswith("dpo: reproduced") for line in verdict.lines), verdict.lines
    tampered = tmp_path / "tampered"
    shutil.copytree(rel, tampered)
    lineage = json.loads((tampered / "lineage.json").read_text())
    lineage["train"]["outputs"]["model.safetensors"] = "sha256:" + "0" * 64
    (tampered / "lineage.json").write_text(json.dumps(lineage))
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["outputs"]["lineage.json"] = sha256_file(tampered / "lineage.json")
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    verdict = verify_release(tampered, tiny_recipe.parent, tmp_path)
    assert verdict.stage == "train" and verdict.max_weight_diff == 0.0, "compared with the last checkpoint, not DPO's"


def test_sft_and_dpo_resume_exactly(tmp_path, tiny_recipe):
    test_dpo_stage_after_sft_caches_reference_log_probs(tmp_path / "straight", tiny_recipe)
    straight = {k: load_file(next((tmp_path / "straight" / "artifacts").glob(f"{k}-*")) / "model.safetensors")
                for k in ("sft", "dpo")}  # fmt: skip
    args = [str(tiny_recipe), "--workdir", str(tmp_path / "resumed"), "--set", "sft.checkpoint_interval=2"]
    for stage, stop in (("sft", 5), ("dpo", 3)):
        first = runner.invoke(app, [stage, *args, "--stop-after", str(stop)])
        assert first.exit_code == 0 and f"stopped after step {stop}" in first.output, first.output
        if stage == "sft":
            partial = next((tmp_path / "resumed" / "artifacts").glob("sft-*.partial"))
            assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == [
                "step-0000002", "step-0000004", "step-0000005"]  # fmt: skip
        second = runner.invoke(app, [stage, *args, "--resume"])
        assert second.exit_code == 0 and f"{stage}: resuming from step-{stop:07d}" in second.output, second.output
        weights = load_file(next((tmp_path / "resumed" / "artifacts").glob(f"{stage}-*[!l]")) / "model.safetensors")
        assert all(torch.equal(weights[k], straight[stage][k]) for k in weights), stage


def test_a_recipe_with_only_sft_from_a_folder_whose_tokenizer_lacks_the_chat_tokens_runs_and_releases(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_outside_llama(tmp_path / "outside")
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    _chat_file(tmp_path)
    sft = f'[sft]\nbase = "{folder}"\ndata = [{{ path = "chat.jsonl", license = "CC0-1.0" }}]\nepochs = 1\n'
    (tmp_path / "r.toml").write_text('name = "x"\n' + sft)  # no [data]: nothing would read it
    pipe = Pipeline(load_recipe(tmp_path / "r.toml"), tmp_path / "runs")
    assert pipe.stages() == ["sft", "eval", "release"]
    art = pipe.run("sft")
    tok = Tokenizer.from_file(str(art.path / "tokenizer.json"))
    assert all(tok.token_to_id(t) is not None for t in ("<|user|>", "<|assistant|>", "<|endoftext|>", "<|pad|>"))
    weights = load_file(art.path / "model.safetensors")
    assert weights["embed_tokens.weight"].shape[0] == vocab + 5 == tok.get_vocab_size()
    assert art.metrics["examples"] == 24
    release = pipe.run("release").path
    assert sorted(json.loads((release / "lineage.json").read_text())) == ["base_model", "eval", "sft"]
    ids = torch.tensor([[1, 5, 9, 2]])
    logits = AutoModelForCausalLM.from_pretrained(release)(ids).logits
    assert torch.allclose(logits, load_model(art.path)(ids), atol=1e-4)
    card = (release / "README.md").read_text()
    assert "## Base model" in card and "## Training data" not in card
    assert "| sft | chat.jsonl | CC0-1.0 |" in (release / "data" / "data_card.md").read_text()
    verdict = verify_release(release, base_dir=tmp_path, workdir=tmp_path)
    assert verdict.reproduced and [line.split(":")[0] for line in verdict.lines] == ["sft", "eval"], verdict.lines


def test_growing_the_vocabulary_keeps_old_logits_and_starts_new_rows_at_the_mean():
    model = Transformer(TransformerConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, context=16))
    model.init_weights(0)
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids)
    model.grow_vocab(53)
    after = model(ids)
    assert torch.allclose(after[..., :50], before) and model.cfg.vocab_size == 53
    assert torch.allclose(model.embed_tokens.weight[50], model.embed_tokens.weight[:50].mean(0))
    padded = Transformer(TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, context=16,
                                           tie_embeddings=False))  # fmt: skip
    padded.init_weights(0)
    old_head = padded.lm_head.weight.detach().clone()
    padded.grow_vocab(52, new_ids=[50, 51])  # a tokenizer of 50 tokens in an embedding padded to 64
    assert padded.cfg.vocab_size == 64, "a padded embedding already has the rows"
    others = torch.ones(64, dtype=torch.bool)
    others[[50, 51]] = False
    assert torch.allclose(padded.lm_head.weight[51], old_head[others].mean(0))
    assert torch.equal(padded.lm_head.weight[:50], old_head[:50])


@pytest.mark.slow
def test_resuming_a_later_stage_resumes_an_interrupted_earlier_one(tmp_path):
    """`clearlm dpo --resume` after pretraining was killed continues pretraining from its checkpoint (found by
    the disk-full trials: the earlier stage restarted from scratch)."""
    from conftest import write_all_stages_recipe

    recipe = load_recipe(write_all_stages_recipe(tmp_path))
    assert Pipeline(recipe, tmp_path / "runs").run("train", stop_after=4) is None
    notes: list[str] = []
    pipe = Pipeline(recipe, tmp_path / "runs")
    pipe.reporter.note = notes.append
    assert pipe.run("dpo", resume=True) is not None
    assert "train: resuming from step-0000004" in notes
