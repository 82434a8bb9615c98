"""Task definitions, prompts, metrics and agreement with lm-evaluation-harness."""

import json
import math
from pathlib import Path

import pytest

from clearlm.errors import InputError
from clearlm.eval.harness import _doc_result, build_requests
from clearlm.eval.metrics import acc_norm_pred, argmax, mean_and_stderr, perplexity
from clearlm.eval.scoring import Score
from clearlm.eval.taskspec import builtin_tasks, load_docs, load_task_file, resolve_tasks

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
TASKS = builtin_tasks()


def _first_requests(name, k=1):
    spec = TASKS[name]
    docs = load_docs(spec, SHARED, limit=k)
    return build_requests(spec, docs, 0, 1234).requests


def test_every_builtin_task_names_its_source_and_licence():
    assert set(TASKS) == {
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "sciq", "openbookqa",
        "social_iqa", "copa", "commonsense_qa", "wsc273", "lambada_openai", "stdlib_next_line", "stdlib_functions",
        "gsm8k", "humaneval", "mbpp", "ifeval", "truthfulqa_mc1", "truthfulqa_mc2", "crows_pairs_english", "bbq",
    }  # fmt: skip
    assert all(spec.source and spec.license != "NOASSERTION" for spec in TASKS.values())


@needs_shared
def test_prompts_match_hand_checked_items():
    q = "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert _first_requests("arc_easy")[0] == (
        f"Question: {q}\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert _first_requests("hellaswag")[3] == (
        "Roof shingle removal: A man is sitting on a roof. he",
        " starts pulling up roofing on a roof.",
    )
    assert _first_requests("winogrande") == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert (
        _first_requests("piqa")[1][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    context, target = _first_requests("lambada_openai")[0]
    assert context.endswith("I don't care about") and target == " signs"
    assert _first_requests("copa")[1] == ("The man turned on the faucet therefore", "  water flowed from the spout.")
    assert _first_requests("social_iqa")[0][0].startswith("Q: Tracy didn't go home") and _first_requests("social_iqa")[
        0
    ][0].endswith("before this?\nA:")
    boolq = _first_requests("boolq")[0][0]
    assert boolq.startswith("All biomass goes through") and boolq.endswith("make that produces?\nAnswer:")
    assert _first_requests("sciq")[0][0].startswith("\nQuestion: Compounds that are capable")
    assert _first_requests("arc_challenge")[2] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:",
        " Planetary days will become shorter.",
    )
    obqa = "A person wants to start saving money so that they can afford a nice vacation at the end of the year."
    assert _first_requests("openbookqa")[1][0].startswith(obqa) and _first_requests("openbookqa")[1][1] == (
        " quit eating lunch out"
    )
    csqa = _first_requests("commonsense_qa")
    assert csqa[0][0].endswith("D. new york\nAnswer:") and [c for _, c in csqa] == [" A", " B", " C", " D"]
    assert _first_requests("wsc273") == [
        ("The city councilmen refused the demonstrators a permit because the city councilmen", "  feared violence."),
        ("The city councilmen refused the demonstrators a permit because the demonstrators", "  feared violence."),
    ]


@needs_shared
def test_every_builtin_task_loads_its_data():
    for spec in (s for s in TASKS.values() if not s.name.startswith("stdlib_")):  # those read a run's split
        docs = load_docs(spec, SHARED, limit=5)
        assert len(docs) == 5
        run = build_requests(spec, docs, 0, 1234)
        assert run.requests if spec.output_type != "generate" else all(run.contexts)


def test_acc_and_acc_norm_from_known_loglikelihoods():
    spec = TASKS["arc_easy"]
    doc = {"question": "q", "choices": ["a", "bbbbbbbb", "cc"], "gold": 1}
    scores = [Score(-2.0, False, 1), Score(-8.0, False, 3), Score(-3.0, False, 1)]
    row = _doc_result(spec, doc, scores)
    assert row["pred"] == 0 and row["acc"] == 0.0  # raw: -2 is best
    assert row["acc_norm"] == 1.0  # per character: -2/1, -8/8 = -1, -3/2: "bbbbbbbb" is best
    assert argmax([1.0, 3.0, 3.0]) == 1, "ties go to the first, as numpy's argmax"
    assert acc_norm_pred([-4.0, -4.0], ["ab", "abcd"]) == 1
    mean, err = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and err == pytest.approx(math.sqrt(0.25 / 4))
    assert perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))


def test_user_task_file_errors(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\ndata_file = "x.jsonl"\ndoc_to_text = "{{q}}"\ndoc_to_target = "{{a}}"\nprompt = 1\n')
    with pytest.raises(InputError, match=r"t\.toml: prompt: unknown key"):
        load_task_file(bad)
    bad.write_text(
        'name = "t"\ndata_file = "x.jsonl"\nsource = "hub/x"\ndoc_to_text = "{{q}}"\ndoc_to_target = "{{a}}"\n'
        'doc_to_choice = "{{c}}"\n'
    )
    spec = load_task_file(bad)
    with pytest.raises(InputError, match=r"x\.jsonl: data file for task 't' not found \(upstream: hub/x"):
        load_docs(spec, None)
    (tmp_path / "x.jsonl").write_text('{"q": "1", "a": 0, "c": ["x"]}\n{"q": "2"}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: task 't' cannot use this row"):
        load_docs(load_task_file(bad), None)
    with pytest.raises(InputError, match="unknown task"):
        resolve_tasks(["nope"], [])


def test_csv_and_parquet_task_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"q": "two plus two", "a": "four", "b": "five", "gold": 0},
        {"q": "sky", "a": "green", "b": "blue", "gold": 1},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("q,a,b,gold\n" + "\n".join(f"{r['q']},{r['a']},{r['b']},{r['gold']}" for r in rows))
    for name in ("d.parquet", "d.csv"):
        (tmp_path / "t.toml").write_text(
            f'name = "t"\ndata_file = "{name}"\ndoc_to_text = "{{{{q}}}} is"\ndoc_to_choice = "{{{{[a, b]}}}}"\n'
            'doc_to_target = "{{gold}}"\n'
        )
        spec = load_task_file(tmp_path / "t.toml")
        docs = load_docs(spec, None)
        assert [spec.choices(d)[spec.target(d)] for d in docs] == ["four", "blue"], name
    (tmp_path / "d.csv").write_text("q,a,b,gold\nsky,green,blue,7\n")
    with pytest.raises(InputError, match=r"d\.csv:2: gold index 7 is outside the 2 choices"):
        load_docs(load_task_file(tmp_path / "t.toml"), None)


def test_example_task_files_load(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples" / "tasks"
    files = sorted(examples.glob("*.toml"))
    assert len(files) >= 2
    for f in files:
        spec = load_task_file(f)
        if (f.parent / spec.data_file).is_file():
            assert load_docs(spec, None)


def _long_context_copy(release: Path, out: Path, context: int = 512) -> Path:
    """The tiny release's tokenizer with a random model of a longer context (lm-eval needs room)."""
    from lm_eval_export import long_context_copy

    return long_context_copy(release, out, context)


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize(
    ("shots", "names"),
    [(0, ("arc_easy", "piqa", "winogrande", "hellaswag", "lambada_openai")), (2, ("arc_easy", "winogrande"))],
)
def test_agreement_with_lm_evaluation_harness(tiny_run, tmp_path, shots, names):
    pytest.importorskip("lm_eval")
    from lm_eval_export import run_lm_eval

    from clearlm.eval.harness import evaluate_tasks
    from clearlm.release.load import bos_token_id, load_release

    release = _long_context_copy(tiny_run.artifacts["release"].path, tmp_path / "model")
    specs = [TASKS[n] for n in names]
    theirs = run_lm_eval(release, specs, SHARED, tmp_path / "lm_eval_tasks", limit=12, batch_size=8, num_fewshot=shots)
    model, tok, eos = load_release(release)
    prefix = bos_token_id(release, eos)
    ours, samples = evaluate_tasks(model, tok, specs, SHARED, prefix_id=prefix, limit=12, num_fewshot=shots)
    for spec in specs:
        mine = [s.get("loglikelihoods", [s.get("loglikelihood")]) for s in samples if s["task"] == spec.name]
        other = theirs[spec.name]["loglikelihoods"]
        assert len(mine) == len(other) == 12
        diff = max(abs(a - b) for x, y in zip(mine, other, strict=True) for a, b in zip(x, y, strict=True))
        assert diff < 1e-4, (spec.name, diff)
        for metric in spec.metrics:  # accuracies identical; perplexity is exp of sums that differ by < 1e-4
            expected = theirs[spec.name]["metrics"][metric]
            if metric == "perplexity":
                expected = pytest.approx(expected, rel=1e-4)
            assert ours[spec.name][metric] == expected, (spec.name, metric)
    json.dumps(ours)


def test_next_line_items_are_deterministic_and_well_formed(tmp_path):
    code = "\n".join(f"line_number_{i} = compute_value({i})" for i in range(40))
    (tmp_path / "validation.jsonl").write_text(
        json.dumps({"id": "m", "text": code}) + "\n" + json.dumps({"id": "short", "text": "x = 1"}) + "\n"
    )
    spec = TASKS["stdlib_next_line"]
    docs = load_docs(spec, tmp_path)
    assert len(docs) == 1, "files too short for four candidates are skipped"
    doc = docs[0]
    lines = code.splitlines()
    answer = doc["choices"][doc["gold"]]
    assert doc["context"].endswith("\n") and lines.index(answer) == len(doc["context"].splitlines()) + (
        lines.index(doc["context"].splitlines()[0])
    )
    assert len(set(doc["choices"])) == 4 and load_docs(spec, tmp_path) == docs


@pytest.mark.slow
@needs_shared
def test_a_non_llama_transformers_folder_scores_as_in_lm_eval(tiny_run, tmp_path):
    """A GPT-2 folder goes through transformers; the numbers still equal lm-eval's."""
    import shutil

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    from lm_eval_export import run_lm_eval

    from clearlm.eval.harness import evaluate_tasks
    from clearlm.release.load import bos_token_id, load_release

    release = tiny_run.artifacts["release"].path
    config = json.loads((release / "config.json").read_text())
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=config["vocab_size"],
            n_positions=512,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            initializer_range=0.3,
        )
    )
    folder = tmp_path / "gpt2"
    gpt2.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(release / name, folder / name)
    specs = [TASKS["arc_easy"]]
    theirs = run_lm_eval(folder, specs, SHARED, tmp_path / "tasks", limit=8, batch_size=8)
    model, tok, eos = load_release(folder)
    assert type(model).__name__ == "TransformersCausalLM"
    ours, samples = evaluate_tasks(model, tok, specs, SHARED, prefix_id=bos_token_id(folder, eos), limit=8)
    pairs = zip([s["loglikelihoods"] for s in samples], theirs["arc_easy"]["loglikelihoods"], strict=True)
    diff = max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True))
    assert diff < 1e-4
    assert ours["arc_easy"]["acc"] == theirs["arc_easy"]["metrics"]["acc"]


def test_prompts_equal_lm_eval_task_code_on_upstream_rows():
    """clearlm's templates on the local rows give the prompts lm-eval's own task code gives upstream rows."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.super_glue.copa import utils as copa

    upstream = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
                "choice2": "Water flowed from the spout.", "question": "effect", "label": 1}  # fmt: skip
    local = {"query": "The man turned on the faucet, therefore",
             "choices": ["the toilet filled with water.", "water flowed from the spout."], "gold": 1}  # fmt: skip
    spec = TASKS["copa"]
    assert spec.text(local) == copa.doc_to_text(upstream)
    assert spec.choices(local) == copa.doc_to_choice(upstream)
    row = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "endings": ["is using wrap.", "starts pulling up roofing [title] on a roof."], "label": "1"}  # fmt: skip
    doc = TASKS["hellaswag"].prepare(row)
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][1] == "starts pulling up roofing. on a roof."


def test_empty_context_matches_lm_eval_with_a_bos_adding_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from clearlm.eval.scoring import Encoder

    tok = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    enc = Encoder(tok, prefix_id=0)
    assert enc.pair("", "a b") == ([0], [1, 2]), "the continuation is encoded without special tokens"
    assert enc.pair("a", " b") == ([0, 1], [2]), "non-empty contexts get the tokenizer's BOS, as in lm-eval"


def test_task_definitions_are_validated(tmp_path):
    f = tmp_path / "t.toml"
    base = 'name = "t"\ndata_file = "x.jsonl"\ndoc_to_text = "{{q}}"\ndoc_to_target = "{{a}}"\n'
    f.write_text(base + 'output_type = "generate"\nmetrics = ["acc"]\n')
    with pytest.raises(InputError, match="do not apply to generate tasks"):
        load_task_file(f)
    f.write_text(base + 'output_type = "generate"\n')
    assert load_task_file(f).metrics == ["exact_match"]
    f.write_text(base)
    with pytest.raises(InputError, match="multiple_choice tasks need doc_to_choice"):
        load_task_file(f)
    f.write_text("- a list\n")
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("- not a mapping\n")
    with pytest.raises(InputError, match="must be a mapping"):
        load_task_file(yaml_file)
    (tmp_path / "x.jsonl").write_text('{"q": "1", "a": 0, "c": ["", "y"]}\n')
    f.write_text(base + 'doc_to_choice = "{{c}}"\n')
    with pytest.raises(InputError, match=r"x\.jsonl:1: task 't' has an empty choice"):
        load_docs(load_task_file(f), None)


def test_too_few_items_for_k_shot_is_an_input_error():
    spec = TASKS["arc_easy"]
    docs = [{"question": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(3)]
    with pytest.raises(InputError, match="too few for 3-shot"):
        build_requests(spec, docs, 3, 1234)


def test_a_data_file_pattern_reads_every_match_in_name_order(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "b.jsonl").write_text('{"q": "b1", "a": "x"}\n{"q": "b2"}\n')
    (tmp_path / "parts" / "a.jsonl").write_text('{"q": "a1", "a": "y"}\n')
    (tmp_path / "t.toml").write_text('name = "t"\ndata_file = "parts/*.jsonl"\noutput_type = "generate"\n'
                                     'doc_to_text = "{{q}}"\ndoc_to_target = "{{a}}"\n')  # fmt: skip
    spec = load_task_file(tmp_path / "t.toml")
    assert [p.name for p in spec.data_paths(None)] == ["a.jsonl", "b.jsonl"]
    assert [d["q"] for d in load_docs(spec, None, limit=2)] == ["a1", "b1"]
    with pytest.raises(InputError, match=r"b\.jsonl:2: .*'a' is undefined"):
        load_docs(spec, None)
    none = spec.model_copy(update={"test_filter": "{{ q == 'zz' }}"})
    with pytest.raises(InputError) as err:  # the pattern where it was looked for, and what excluded every row
        load_docs(none, None)
    assert str(err.value) == f"{tmp_path / 'parts' / '*.jsonl'}: no documents pass test_filter \"{{{{ q == 'zz' }}}}\""
    from clearlm.eval.results import describe_inputs

    (tmp_path / "parts" / "b.jsonl").write_text('{"q": "b1", "a": "x"}\n')
    files = describe_inputs(tmp_path, [spec], None)["data"]["t"]["files"]
    assert list(files) == [str(tmp_path / "parts" / n) for n in ("a.jsonl", "b.jsonl")]
    assert all(v.startswith("sha256:") for v in files.values())
