"""Generative and bias/truthfulness tasks: filters, metrics and code execution, and agreement with
lm-evaluation-harness's own task configs on the same model and local files."""

import json
import math
import sys
from pathlib import Path

import pytest

from clearlm.errors import InputError
from clearlm.eval import bbq
from clearlm.eval.filters import Filter, FilterStep, apply_filter
from clearlm.eval.generative import generation_rows
from clearlm.eval.harness import _aggregate, evaluate_tasks
from clearlm.eval.metrics import exact_match, pass_at_k
from clearlm.eval.taskspec import ExactMatch, TaskSpec, builtin_tasks, capped, load_docs, load_task_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
TASKS = builtin_tasks()
GENERATIVE = ("gsm8k", "humaneval", "mbpp", "truthfulqa_mc1", "truthfulqa_mc2", "crows_pairs_english", "bbq", "ifeval")


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(3, 2, 2) == 1.0  # fewer failures than k: every k-subset has a pass


def test_exact_match_and_filters_equal_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter, WhitespaceFilter
    from lm_eval.filters.selection import MajorityVoteFilter

    gsm = TASKS["gsm8k"]
    responses = [" The answer is #### 1,234.", "It is $72.", "#### -5", "no number", "3.50 dollars, then 12", "",
                 " Ünïcode ÄB #### 7.\n", "  spaced  "]  # fmt: skip
    references = ["He pays 1234.\n#### 1234", "#### 72", "x\n#### -5", "#### 0", "#### 12", "#### 0", "#### 7", "a"]
    for flt in gsm.filters:
        step = flt.steps[0]
        theirs = RegexFilter(step.pattern, step.group_select).apply([[r] for r in responses], [])
        ours = [apply_filter(flt, [r], {}) for r in responses]
        assert ours == [t[0] for t in theirs], flt.name
        for answer, ref in zip(ours, references, strict=True):
            expected = exact_match_hf_evaluate([answer], [ref], regexes_to_ignore=gsm.exact_match.regexes_to_ignore,
                                               ignore_case=True)["exact_match"]  # fmt: skip
            assert exact_match(answer, ref, gsm.exact_match) == expected
    assert sum(exact_match(apply_filter(gsm.filters[0], [r], {}), ref, gsm.exact_match)
               for r, ref in zip(responses, references, strict=True)) >= 3  # fmt: skip
    options = ExactMatch(ignore_punctuation=True, ignore_numbers=True, ignore_case=True)
    for a, b in (("Hello, World 42!", "hello world"), ("a.b", "ab"), ("x", "y"), ("ÀB", "àb")):
        expected = exact_match_hf_evaluate([a], [b], ignore_case=True, ignore_punctuation=True, ignore_numbers=True)
        assert exact_match(a, b, options) == expected["exact_match"]
    votes = ["7", "3", "7", "3", "3"]
    majority = Filter(name="vote", steps=[FilterStep(function="majority_vote"), FilterStep(function="take_first")])
    assert apply_filter(majority, votes, {}) == next(iter(MajorityVoteFilter().apply([votes], [])))[0]
    strip = Filter(name="s", steps=[FilterStep(function="remove_whitespace")])
    assert apply_filter(strip, responses, {}) == next(iter(WhitespaceFilter().apply([responses], [])))


def _bbq_row(disambiguated: bool, acc: float, biased: float, non_unknown: float, category: str = "Age") -> dict:
    return {"acc": acc, "biased": biased, "non_unknown": non_unknown, "disambiguated": disambiguated,
            "category": category}  # fmt: skip


def test_bbq_scores_follow_the_papers_definitions():
    """Hand-computed: disambiguated, 4 non-unknown answers of which 3 biased: S_DIS = 2 * 3/4 - 1 = 0.5;
    ambiguous, accuracy 1/4 and 2 biased of 2 non-unknown answers: S_AMB = (1 - 1/4) * (2 * 2/2 - 1) = 0.75."""
    rows = [_bbq_row(True, 1, 1, 1), _bbq_row(True, 0, 1, 1), _bbq_row(True, 1, 1, 1), _bbq_row(True, 1, 0, 1),
            _bbq_row(True, 0, 0, 0), _bbq_row(False, 1, 0, 0), _bbq_row(False, 0, 1, 1), _bbq_row(False, 0, 1, 1),
            _bbq_row(False, 0, 0, 0, "Religion")]  # fmt: skip
    out = bbq.aggregate(rows)
    assert out["accuracy_disamb"] == pytest.approx(3 / 5) and out["accuracy_amb"] == pytest.approx(1 / 4)
    assert out["disamb_bias_score"] == pytest.approx(0.5)
    assert out["amb_bias_score"] == pytest.approx(0.75 * 1.0)
    assert out["amb_bias_score_Religion"] == 0.0  # no biased answer: 0, as lm-eval reports it
    assert math.isnan(out["disamb_bias_score_Religion"])  # no disambiguated item of that category


@needs_shared
def test_bbq_rows_get_lm_evals_choices_targets_and_biased_answers():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.bbq import utils

    spec = TASKS["bbq"]
    for line in (SHARED / "bbq" / "Age.jsonl").read_text().splitlines()[:300:7]:
        row = json.loads(line)
        ours = spec.prepare(row)
        biased = _lm_eval_bbq_doc(utils, row)
        assert ours["choices"] == utils.doc_to_choice(biased)
        assert ours["targets"][0] == utils.doc_to_target(biased)
        assert [ours["choices"][i] for i in ours["biased"]] == [c for c in ours["choices"] if c in
                                                                 biased["biased_answers"]]  # fmt: skip
        for pred in range(len(ours["choices"])):
            mine, other = bbq.item(ours, pred), utils._process_results(biased, pred)
            assert mine["acc"] == other["acc"]
            assert (mine["biased"], mine["non_unknown"]) == other["amb_bias_score"][1:3]


def _lm_eval_bbq_doc(utils, doc: dict) -> dict:
    """lm-eval's process_docs applied to one row (it maps a datasets.Dataset)."""
    import datasets

    return utils.process_docs(datasets.Dataset.from_list([doc]))[0]


@needs_shared
@pytest.mark.parametrize(("name", "field"), [("humaneval", "canonical_solution"), ("mbpp", "code")])
def test_code_tasks_pass_reference_solutions_and_fail_wrong_ones_in_the_sandbox(name, field):
    spec = TASKS[name]
    docs = load_docs(spec, SHARED, limit=4)
    rows = generation_rows(spec, docs, [[d[field]] for d in docs], workers=2)
    key = "pass@1,create_test" if name == "humaneval" else "pass@1"
    assert _aggregate(spec, rows)[key] == 1.0
    hostile = ["import os\nos._exit(0)\n", "while True: pass\n", "    return None\n", "open('/etc/passwd').read()\n"]
    rows = generation_rows(spec, docs, [[h] for h in hostile], workers=2)
    assert _aggregate(spec, rows)[key] == 0.0
    reasons = [r for row in rows for v in row["verdicts"].values() for r in v]
    assert all(r != "passed" for r in reasons) and len(reasons) == 4


@needs_shared
def test_pass_at_k_over_sampled_repeats(tmp_path):
    """Four samples per problem, two of them right: pass@1 = 2/4 and pass@2 = 1 - C(2,2)/C(4,2) = 5/6, per item and
    averaged; the samples come from the engine with the task's temperature and a seed per repeat."""
    for name, key in (("humaneval", "{},create_test"), ("mbpp", "{}")):  # a filter's answers; every response
        spec = TASKS[name].model_copy(update={"repeats": 4, "temperature": 0.8, "pass_k": [1, 2]})
        docs = load_docs(spec, SHARED, limit=2)
        right = [d["canonical_solution" if name == "humaneval" else "code"] for d in docs]
        rows = generation_rows(spec, docs, [[r, "    return None\n", r, "    pass\n"] for r in right], workers=2)
        metrics = _aggregate(spec, rows)
        assert metrics[key.format("pass@1")] == pytest.approx(0.5)
        assert metrics[key.format("pass@2")] == pytest.approx(5 / 6)
        assert [v.count("passed") for row in rows for v in row["verdicts"].values()] == [2, 2]


def test_few_shot_examples_are_drawn_as_lm_evals_samplers_draw_them():
    """From the evaluated rows the item itself is never an example (first_n takes the first k others); from rows of
    their own, first_n takes the first k and the random sampler draws exactly k (lm-eval's ContextSampler)."""
    import random

    from clearlm.eval.harness import _fewshot_prefix

    base = {"name": "t", "data_file": "d.jsonl", "output_type": "generate", "doc_to_text": "{{q}}",
            "doc_to_target": "{{a}}", "target_delimiter": "=", "fewshot_delimiter": ";"}  # fmt: skip
    pool = [{"q": str(i), "a": str(i * i)} for i in range(6)]
    first_n = TaskSpec.model_validate({**base, "fewshot_sampler": "first_n"})
    assert _fewshot_prefix(first_n, pool, pool[1], 2, random.Random(0)) == "0=0;2=4;"
    separate = TaskSpec.model_validate({**base, "fewshot_filter": "{{ true }}"})
    drawn = _fewshot_prefix(separate, pool, pool[1], 2, random.Random(1234))
    expected = random.Random(1234).sample(pool, 2)
    assert drawn == "".join(f"{d['q']}={d['a']};" for d in expected)
    with pytest.raises(InputError, match="too few"):
        _fewshot_prefix(first_n, pool, pool[0], 6, random.Random(0))


def test_task_files_for_generation_are_checked(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "1+1", "a": "2"}\n{"q": 3}\n')
    base = 'name = "t"\ndata_file = "d.jsonl"\noutput_type = "generate"\n'
    base += 'doc_to_text = "{{q}}"\ndoc_to_target = "{{a}}"\n'
    cases = {
        '[[filters]]\nname = "f"\nsteps = [{ function = "regex", pattern = "(" }]\n': "not a valid regular",
        '[[filters]]\nname = "f"\nsteps = [{ function = "regex" }]\n': "needs `pattern`",
        'metrics = ["pass@k"]\npass_k = [5]\n': "needs at least 5 repeats",
        "repeats = 4\n": "greedy",
        'metrics = ["pass@k"]\nrepeats = 2\ntemperature = 1.0\n[[filters]]\nname = "f"\n'
        'steps = [{ function = "take_first" }]\n': "must not end with take_first",
        '[[filters]]\nname = "f"\nsteps = [{ function = "regex", pattern = "x" }]\n': "end every filter",
        '[[filters]]\nname = "f"\nsteps = [{ function = "take_first" }, { function = "lowercase" }]\n': "last step",
        '[[filters]]\nname = "f"\nsteps = [{ function = "template", template = "{{ x" }]\n': "not valid Jinja",
        'metrics = ["pass@k"]\npass_k = [0]\n': "pass_k.0",
        "fewshot_fields = { a = 1 }\n": "fewshot_fields need fewshot_filter",
        'metrics = ["mc2"]\n': "do not apply",
        '[[filters]]\nname = "f"\nsteps = [{ function = "shout" }]\n': "filters.0.steps.0.function",
    }
    for extra, message in cases.items():
        (tmp_path / "t.toml").write_text(base + extra)
        with pytest.raises(InputError, match=message) as err:
            load_task_file(tmp_path / "t.toml")
        assert "\n" not in str(err.value) and str(tmp_path / "t.toml") in str(err.value)
    for data_file, message in (("/etc/x.jsonl", "inside the data directory"), ("../x.jsonl", "inside the data")):
        (tmp_path / "t.toml").write_text(base.replace("d.jsonl", data_file))
        with pytest.raises(InputError, match=message):
            load_task_file(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text(base)
    spec = load_task_file(tmp_path / "t.toml")
    with pytest.raises(InputError, match=r"d\.jsonl:2: .*'a' is undefined"):
        load_docs(spec, None)
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(b"not gzip")
    (tmp_path / "t.toml").write_text(base.replace("d.jsonl", "bad.jsonl.gz"))
    with pytest.raises(InputError, match="not a readable gzip file"):
        load_docs(load_task_file(tmp_path / "t.toml"), None)


@pytest.mark.parametrize("name", ["gsm8k", "humaneval", "mbpp"])
def test_generation_settings_are_lm_evals(name):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval_export import their_yaml

    theirs = their_yaml(Path(lm_eval.__file__).parent / "tasks" / name / f"{name}.yaml")
    spec = TASKS[name]
    assert spec.doc_to_text == theirs["doc_to_text"] and spec.doc_to_target == theirs["doc_to_target"]
    assert spec.until == theirs["generation_kwargs"]["until"]
    assert spec.max_gen_tokens == theirs["generation_kwargs"].get("max_gen_toks", 256)
    assert spec.target_delimiter == theirs.get("target_delimiter", " ")
    assert spec.num_fewshot == theirs.get("num_fewshot", 0)
    for flt, their in zip(spec.filters, theirs.get("filter_list", []), strict=False):
        assert flt.name == their["name"]
        regexes = [s for s in their["filter"] if s["function"] == "regex"]
        assert [s.pattern for s in flt.steps if s.function == "regex"] == [s["regex_pattern"] for s in regexes]
    if name == "gsm8k":
        metric = theirs["metric_list"][0]
        assert spec.exact_match.regexes_to_ignore == metric["regexes_to_ignore"]
        assert spec.exact_match.ignore_case == metric["ignore_case"]
    if name == "mbpp":  # the three examples are lm-eval's, row for row
        sys.path.insert(0, str(Path(lm_eval.__file__).parent / "tasks" / "mbpp"))
        source = (Path(lm_eval.__file__).parent / "tasks" / "mbpp" / "utils.py").read_text()
        namespace: dict = {}
        exec(source[source.index("def list_fewshot_samples") :], namespace)  # lm-eval's own literal list
        samples = namespace["list_fewshot_samples"]()
        if SHARED.is_dir():
            ours = load_docs(spec, SHARED, fewshot=True)
            assert [{k: d[k] for k in s} for d, s in zip(ours, samples, strict=True)] == samples


@pytest.mark.slow
@needs_shared
def test_generative_tasks_agree_with_lm_evaluation_harness(tiny_run, tmp_path):
    """lm-eval's own task configs (its YAMLs and hooks, pointed at the same local files) against clearlm's built-in
    tasks on one model: the same prompts, token-identical greedy generations, the same extracted answers and
    metrics. HumanEval and MBPP run through lm-eval with their settings but clearlm's sandbox for the tests (lm-eval's
    code_eval loads a metric from the Hugging Face hub)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("langdetect")
    from lm_eval_export import run_lm_eval_native
    from test_tasks import _long_context_copy

    from clearlm.release.load import bos_token_id, load_release

    model_dir = _long_context_copy(tiny_run.artifacts["release"].path, tmp_path / "model", context=1280)
    specs = capped([TASKS[n] for n in GENERATIVE], 48)
    theirs = run_lm_eval_native(model_dir, specs, SHARED, tmp_path / "lm_eval", limit=6, batch_size=4)
    model, tok, eos = load_release(model_dir)
    prefix = bos_token_id(model_dir, eos)
    for spec in specs:
        ours, samples = evaluate_tasks(model, tok, [spec], SHARED, prefix_id=prefix, eos_id=eos, limit=6,
                                       batch_size=4)  # fmt: skip
        other = theirs[spec.name]
        assert [s["context"] for s in samples] == other["contexts"], spec.name
        if spec.output_type == "generate":
            assert [s["generations"][0] for s in samples] == other["generations"], spec.name
        else:
            diff = max(abs(a - b) for s, t in zip(samples, other["loglikelihoods"], strict=True)
                       for a, b in zip(s["loglikelihoods"], t, strict=True))  # fmt: skip
            assert diff < 1e-4, (spec.name, diff)
        assert other["metrics"], spec.name
        for key, value in other["metrics"].items():
            mine = ours[spec.name].get(key, math.nan)  # lm-eval reports BBQ's absent categories as NaN
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(mine), (spec.name, key)
            else:
                assert mine == pytest.approx(value, rel=1e-4, abs=1e-6), (spec.name, key, mine, value)
