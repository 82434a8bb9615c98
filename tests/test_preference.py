import json

import pytest

from clearlm.errors import InputError
from clearlm.eval.preference import preference_accuracy, read_preferences, split_transcripts
from clearlm.eval.scoring import Encoder, score_requests
from clearlm.release.load import load_release


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, here is how."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No."
    prompt, c, r = split_transcripts(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:"
    assert (c, r) == (" Sure, here is how.", " No.")
    same_start = split_transcripts("\n\nHuman: a\n\nAssistant: Yes it is", "\n\nHuman: a\n\nAssistant: Yes no")
    assert same_start == ("\n\nHuman: a\n\nAssistant:", " Yes it is", " Yes no")


def test_preference_file_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"chosen": "x"}))
    with pytest.raises(InputError, match=r"p\.jsonl:2: field 'rejected' is missing"):
        read_preferences(f)
    f.write_text(json.dumps({"chosen": "no turns", "rejected": "at all"}) + "\n")
    with pytest.raises(InputError, match=r"p\.jsonl:1: the two transcripts share no"):
        read_preferences(f)


@pytest.mark.slow
def test_accuracy_counts_pairs_where_chosen_scores_higher(tiny_run):
    model, tok, eos = load_release(tiny_run.artifacts["release"].path)
    enc = Encoder(tok, eos)
    triples = [("def f():\n    return", " value", " loss loss loss"), ("import", " data", " x"), ("a", " b", " b")]
    metrics, rows = preference_accuracy(model, enc, triples, reference=model)
    scores = score_requests(model, enc, [(p, a) for p, c, r in triples for a in (c, r)])
    expected = [float(scores[2 * i].logprob > scores[2 * i + 1].logprob) for i in range(3)]
    assert metrics["accuracy"] == pytest.approx(sum(expected) / 3)
    assert rows[2]["chosen_logprob"] == rows[2]["rejected_logprob"] and expected[2] == 0.0, "a tie counts as wrong"
    assert metrics["accuracy_dpo"] == 0.0 and all(r["dpo_margin"] == 0.0 for r in rows)
    assert metrics["samples"] == 3 and metrics["skipped"] == 0
