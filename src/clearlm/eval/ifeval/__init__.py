"""IFEval (instruction-following) scoring, identical to lm-evaluation-harness's `ifeval` task.

`score_response(doc, response)` scores one response to an IFEval prompt (a row of IFEval's `input_data.jsonl`, or of
the `google/IFEval` dataset: `key`, `prompt`, `instruction_id_list`, `kwargs`) as lm-eval's `process_results` does;
`aggregate(rows)` turns the scores into the task's four metrics.

Origin: the instruction checkers of lm-evaluation-harness 0.4.13 (the PyPI release), `lm_eval/tasks/ifeval/`:
`instructions.py`, `instructions_registry.py`, `instructions_util.py` and `utils.py` (sha256 511cc41a..., 9db1c062...,
e8c4d918..., 1ab8f148...), with the aggregation of its `ifeval.yaml`. lm-eval (EleutherAI, MIT licence) took them
from google-research's `instruction_following_eval/` (Copyright 2023 The Google Research Authors, Apache-2.0).
This port is under Apache-2.0; each ported file keeps the Google Research licence header and says it was changed.

Changes from lm-eval (the checks themselves, their regexes, word and sentence counting, NLTK Punkt sentence
splitting and langdetect calls are unchanged, and tests/test_ifeval.py compares the two on all 541 prompts):

- No download: lm-eval downloads NLTK's `punkt_tab` data when `instructions_util` is imported. clearlm does not ship
  that data (its licence is unclarified upstream) and never fetches it; it uses it where NLTK finds it (NLTK_DATA or
  NLTK's default folders) and otherwise raises a one-line `InputError` saying how to get it.
- nltk and langdetect (the `clearlm[ifeval]` extra) are imported when scoring starts, not when this package is
  imported; missing, they raise an `InputError`. The Punkt tokenizer is `nltk.tokenize.PunktTokenizer("english")`,
  which is what lm-eval's `nltk.data.load("nltk:tokenizers/punkt/english.pickle")` returns with nltk >= 3.9.
- `immutabledict` is replaced by `types.MappingProxyType`.
- Only scoring is kept: the instruction texts (`build_description` now just stores the arguments),
  `get_instruction_args(_keys)`, the unregistered checkers, `INSTRUCTION_CONFLICTS`, `split_into_sentences`,
  `generate_keywords` and its word list, the `InputExample`/`OutputExample` classes and the unreachable re-build
  with `prompt=` are gone.
- Where lm-eval would draw a missing or invalid argument at random (and so score against an instruction the prompt
  never gave), clearlm raises an `InputError`; IFEval's data never does this. One exception is kept as is because
  IFEval's data reaches it: `keywords:letter_frequency` with a letter that is not one ASCII letter (prompts 1122 and
  1129 ask for "#" and "!") checks a random letter, drawn separately for the strict and the loose score in the same
  order as lm-eval (from the caller's generator; lm-eval's is the global `random`, seeded 0 before a run).
- Unknown instruction ids and bad arguments raise an `InputError` (lm-eval: KeyError, TypeError or ValueError).
- langdetect failures are logged at debug level, not error (lm-eval logs the whole response each time).
- Types, docstrings, ruff formatting.

Quirks kept from upstream: kwargs values that are falsy (None, but also 0 or "") are dropped before building a
checker; keywords and forbidden words are regular expressions.

Two changes for reproducibility: language detection uses a langdetect factory of its own seeded 0 (lm-eval leaves it
unseeded, so a borderline text's language can change between its runs), and the letter drawn for a letter-frequency
instruction that names none comes from a generator the caller passes (lm-eval: the global `random`, seeded 0).
"""

from clearlm.eval.ifeval.instructions_util import PUNKT_MISSING
from clearlm.eval.ifeval.utils import METRICS, aggregate, score_response

__all__ = ["METRICS", "PUNKT_MISSING", "aggregate", "score_response"]
