"""IFEval scoring: clearlm's port against lm-evaluation-harness's `ifeval` task on every prompt, and its errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from clearlm.errors import InputError
from clearlm.eval.ifeval import METRICS, PUNKT_MISSING, aggregate, score_response
from clearlm.eval.ifeval.instructions_registry import INSTRUCTION_DICT

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IFEVAL = SHARED / "ifeval" / "input_data.jsonl"
PUNKT = SHARED / "nltk_punkt_tab"
needs_shared = pytest.mark.skipif(not IFEVAL.is_file(), reason="../shared/data is not beside the checkout")

RICH = """<<A Day at the Lake>>

SECTION 1
The morning was quiet, and the water was still. We walked along the shore, talking about the week ahead. \
*The lake was calm* and the air smelled of pine. Dr. Smith said it was the best day of the year!

Section 2
Here is what we packed:
* a thermos of coffee
* two sandwiches
- a map of the trails
- sunscreen

***

**Dear [name],** please send the tickets to [address] before [date]. The lake, the hills and the village are all \
within walking distance, so you will not need a car. However, the weather can change quickly. \
"Mind the storms," my friend said. Is it worth it? Yes... It is.

P.S. Bring a warm jacket. Is there anything else I can help with?"""

LOWER = """the river runs through the old town and past the mill where the miller works all day.

children play on the bridge while their parents talk about the harvest and the price of bread.

in the evening the lights come on one by one and the town grows quiet until the morning comes again."""

JSON_BLOCK = """```json
{"title": "A Day at the Lake", "sentences": ["The lake was calm.", "We walked along the shore."], "rating": 5}
```"""

GERMAN = (
    "Der Morgen war ruhig, und das Wasser lag still. Wir gingen am Ufer entlang und sprachen über die kommende "
    "Woche. Am Abend kehrten wir müde, aber glücklich nach Hause zurück, und niemand wollte schlafen gehen."
)
ITALIAN = (
    "La mattina era tranquilla e l'acqua del lago era ferma. Abbiamo camminato lungo la riva parlando della "
    "settimana che ci aspettava, poi siamo tornati a casa stanchi ma felici."
)
RUSSIAN = "Утро было тихим, и вода в озере была неподвижной. Мы гуляли по берегу и говорили о предстоящей неделе."
HINDI = "सुबह शांत थी और झील का पानी स्थिर था। हम किनारे पर टहलते हुए आने वाले सप्ताह के बारे में बात करते रहे।"
KOREAN = "아침은 조용했고 호수의 물은 잔잔했다. 우리는 호숫가를 따라 걸으며 다음 주에 대해 이야기했다."
FOREIGN = {"de": GERMAN, "it": ITALIAN, "ru": RUSSIAN, "hi": HINDI, "ko": KOREAN}
TWO = '"My answer is yes. The lake is calm today.\n******\nMy answer is no. The lake is rough today."'
SNIPPETS = [RICH, LOWER, JSON_BLOCK, *FOREIGN.values(), TWO, "My answer is maybe.", "HELLO WORLD, AGAIN."]


def tailored(doc: dict) -> str:
    """A response built from the prompt's own arguments, so that many of its instructions pass."""
    head, body, tail, only_body = [doc["prompt"]], [], [], False
    for instruction_id, kwargs in zip(doc["instruction_id_list"], doc["kwargs"], strict=True):
        kind = instruction_id.split(":")[1]
        if kind == "existence":
            body.append("We talk about " + " and ".join(kwargs["keywords"]) + ".")
        elif kind == "frequency":
            body.append(" ".join([kwargs["keyword"]] * kwargs["frequency"]) + ".")
        elif kind == "letter_frequency":
            body.append(kwargs["letter"] * kwargs["let_frequency"])
        elif kind == "number_placeholders":
            body.append(" ".join(f"[field {i}]" for i in range(kwargs["num_placeholders"])))
        elif kind == "number_bullet_lists":
            body.append("\n".join(f"* point {i}" for i in range(kwargs["num_bullets"])))
        elif kind == "number_highlighted_sections":
            body.append(" ".join(f"*part {i}*" for i in range(kwargs["num_highlights"])))
        elif kind == "multiple_sections":
            body += [f"{kwargs['section_spliter']} {i}\nSome text." for i in range(1, kwargs["num_sections"] + 1)]
        elif kind == "nth_paragraph_first_word":
            body = [f"{kwargs['first_word'].capitalize()} comes first here."] * kwargs["num_paragraphs"]
            only_body = True
        elif kind == "number_words":  # "well-known" is two words to lm-eval, a hyphenated word to others
            body.append(" ".join(["well-known"] * (kwargs["num_words"] // 2)))
        elif kind == "number_sentences":  # Punkt knows "Dr." is no sentence end
            body.append(" ".join(f"Dr. Lee wrote line {i}." for i in range(kwargs["num_sentences"])))
        elif kind == "capital_word_frequency":  # NLTK splits "DON'T" into "DO" and "N'T"
            body.append(" ".join(["DON'T"] * (kwargs["capital_frequency"] // 2 + 1)))
        elif kind == "number_paragraphs":
            body.append("\n***\n".join(["A paragraph."] * kwargs["num_paragraphs"]))
        elif kind == "title":
            head.insert(0, "<<A Title>>")
        elif kind == "constrained_response":
            body.append("My answer is yes.")
        elif kind == "postscript":
            tail.append(f"{kwargs['postscript_marker']} Thanks for reading.")
        elif kind == "end_checker":
            tail.append(kwargs["end_phrase"])
        elif kind == "two_responses":
            tail.append("******\nA second, different answer.")
    text = "\n\n".join(body if only_body else head + body + tail)
    return f'"{text}"' if "startend:quotation" in doc["instruction_id_list"] else text


def responses(doc: dict) -> dict[str, str]:
    """Several responses to one prompt, meant to make every kind of instruction pass somewhere and fail somewhere."""
    rng = random.Random(doc["key"])
    languages = [kwargs["language"] for kwargs in doc["kwargs"] if "language" in kwargs]
    foreign = FOREIGN.get(languages[0]) if languages else None
    mixed = "\n\n".join(rng.sample(SNIPPETS, 3))
    return {
        "empty": "",
        "prompt": doc["prompt"],
        "rich": RICH,
        "upper": RICH.upper(),
        "json": JSON_BLOCK,
        "foreign": foreign or list(FOREIGN.values())[doc["key"] % len(FOREIGN)],
        "mixed": mixed,
        "tailored": tailored(doc),
        "tailored_lower": tailored(doc).lower().replace(",", ""),
    }


@pytest.fixture(scope="module")
def punkt():
    """NLTK finds ../shared/data's punkt_tab (so lm-eval downloads nothing); langdetect is seeded (it is random
    otherwise, in lm-eval and clearlm alike)."""
    nltk = pytest.importorskip("nltk")
    langdetect = pytest.importorskip("langdetect")
    if not PUNKT.is_dir():
        pytest.skip("../shared/data/nltk_punkt_tab is not beside the checkout")
    nltk.data.path.insert(0, str(PUNKT))
    seed, langdetect.DetectorFactory.seed = langdetect.DetectorFactory.seed, 0
    yield
    langdetect.DetectorFactory.seed = seed
    nltk.data.path.remove(str(PUNKT))


@pytest.fixture(scope="module")
def lm_eval_ifeval(punkt):
    """lm-eval's ifeval utils (imported once NLTK finds punkt_tab: lm-eval downloads it otherwise)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.ifeval import utils

    return utils


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    if not IFEVAL.is_file():
        pytest.skip("../shared/data/ifeval is not beside the checkout")
    return [json.loads(line) for line in IFEVAL.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def scored(lm_eval_ifeval, docs) -> list[tuple[dict, str, dict, dict]]:
    """(doc, response name, clearlm's score, lm-eval's score) for every prompt and response. Python's `random` is
    seeded alike for both (clearlm's scorer takes its own generator): two prompts ask for a letter that is not one,
    which both replace by a random letter."""
    rows, state = [], random.getstate()
    for doc in docs:
        for name, response in responses(doc).items():
            random.seed(doc["key"])
            theirs = lm_eval_ifeval.process_results(doc, [response])
            rows.append((doc, name, score_response(doc, response, random.Random(doc["key"])), theirs))
    random.setstate(state)
    return rows


@needs_shared
def test_scores_equal_lm_evals_on_every_prompt(scored, docs):
    assert len(docs) == 541
    mismatches = [(doc["key"], name, ours, theirs) for doc, name, ours, theirs in scored if ours != theirs]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]}"
    ours = scored[0][2]
    assert list(ours) == list(METRICS)
    assert type(ours["prompt_level_strict_acc"]) is bool
    assert all(type(x) is bool for x in ours["inst_level_loose_acc"])


@needs_shared
def test_every_instruction_kind_passes_and_fails_somewhere(scored):
    seen = defaultdict(set)
    for doc, _, ours, _ in scored:
        for instruction_id, strict, loose in zip(
            doc["instruction_id_list"], ours["inst_level_strict_acc"], ours["inst_level_loose_acc"], strict=True
        ):
            seen[instruction_id] |= {("strict", strict), ("loose", loose), ("loose only", loose and not strict)}
    assert set(seen) == set(INSTRUCTION_DICT)
    for outcomes in seen.values():
        assert {("strict", True), ("strict", False), ("loose", True), ("loose", False)} <= outcomes
    assert sum(("loose only", True) in outcomes for outcomes in seen.values()) >= len(seen) // 2


@needs_shared
def test_aggregate_equals_lm_evals_aggregation(scored, lm_eval_ifeval):
    from lm_eval.api.metrics import mean

    by_name = defaultdict(list)
    for _, name, ours, theirs in scored:
        by_name[name].append((ours, theirs))
    for name, pairs in by_name.items():
        expected = {
            m: (mean if m.startswith("prompt") else lm_eval_ifeval.agg_inst_level_acc)([t[m] for _, t in pairs])
            for m in METRICS
        }
        assert aggregate([o for o, _ in pairs]) == expected, name
    overall = aggregate([o for _, _, o, _ in scored])
    assert all(0 < overall[m] < 1 for m in METRICS)


@needs_shared
def test_rows_with_none_kwargs_as_in_the_hf_dataset_score_alike(lm_eval_ifeval, docs):
    """google/IFEval on the Hugging Face hub gives every kwargs dict every argument name, None where unused."""
    names = sorted({name for doc in docs for kwargs in doc["kwargs"] for name in kwargs})
    state, mismatches = random.getstate(), []
    for doc in docs:
        hf = {**doc, "kwargs": [{n: kwargs.get(n) for n in names} for kwargs in doc["kwargs"]]}
        response = tailored(doc)
        random.seed(doc["key"])
        theirs = lm_eval_ifeval.process_results(hf, [response])
        ours = []
        for row in (hf, doc):
            ours.append(score_response(row, response, random.Random(doc["key"])))
        if ours != [theirs, theirs]:
            mismatches.append(doc["key"])
    random.setstate(state)
    assert mismatches == []


def test_every_instruction_in_the_data_is_registered(docs):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT as LM_EVAL_DICT

    assert {i for doc in docs for i in doc["instruction_id_list"]} == set(INSTRUCTION_DICT)
    assert {k: v.__name__ for k, v in INSTRUCTION_DICT.items()} == {k: v.__name__ for k, v in LM_EVAL_DICT.items()}


def test_aggregate_of_hand_made_rows():
    rows = [
        {"prompt_level_strict_acc": True, "inst_level_strict_acc": [True], "prompt_level_loose_acc": True,
         "inst_level_loose_acc": [True]},
        {"prompt_level_strict_acc": False, "inst_level_strict_acc": [True, True, False], "prompt_level_loose_acc": True,
         "inst_level_loose_acc": [True, True, True]},
    ]  # fmt: skip
    assert aggregate(rows) == {
        "prompt_level_strict_acc": 0.5,
        "inst_level_strict_acc": 0.75,
        "prompt_level_loose_acc": 1.0,
        "inst_level_loose_acc": 1.0,
    }
    with pytest.raises(InputError):
        aggregate([])


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "message"),
    [
        ("punctuation:no_commas", {}, "unknown instruction"),
        ("length_constraints:number_words", {"relation": "at least"}, "num_words is missing"),
        ("length_constraints:number_words", {"num_words": 0, "relation": "at least"}, "num_words is missing"),
        ("keywords:frequency", {"keyword": "a", "frequency": 2, "relation": "at most"}, "relation is missing"),
        ("language:response_language", {"language": "xx"}, "language is missing"),
        ("punctuation:no_comma", {"num_words": 3}, "bad arguments"),
    ],
)
def test_bad_rows_raise_input_errors_not_random_instructions(punkt, instruction_id, kwargs, message):
    doc = {"key": 1, "prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    with pytest.raises(InputError, match=message):
        score_response(doc, "Some response.")


# the end of both subprocess scripts: score one response, print the clearlm error it raises
_SCORE_ONE = """from clearlm.errors import ClearlmError
doc = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
try:
    score_response(doc, "No commas here.")
except ClearlmError as e:
    print(type(e).__name__, str(e), sep=": ")
"""


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_missing_punkt_data_is_one_clear_line(tmp_path):
    pytest.importorskip("nltk")
    pytest.importorskip("langdetect")
    # NLTK_DATA is an empty folder and NLTK's default folders (which could hold punkt_tab) are dropped too
    script = (
        """
import os, nltk
nltk.data.path[:] = [os.environ["NLTK_DATA"]]
from clearlm.eval.ifeval import score_response
"""
        + _SCORE_ONE
    )
    out = _run(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"InputError: {PUNKT_MISSING}\n"
    assert "NLTK_DATA" in PUNKT_MISSING and "punkt_tab" in PUNKT_MISSING


def test_import_is_cheap_and_missing_packages_are_one_clear_line(tmp_path):
    script = (
        """
import sys
sys.modules["nltk"] = None  # as if not installed
from clearlm.eval.ifeval import score_response
assert not {"nltk", "langdetect"} & {m for m, v in sys.modules.items() if v is not None}, "imported eagerly"
"""
        + _SCORE_ONE
    )
    out = _run(script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "InputError: ifeval needs the nltk and langdetect packages: pip install 'clearlm[ifeval]'"
    )
    assert out.stdout.count("\n") == 1
