# Copyright 2023 The Google Research Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Ported from lm-evaluation-harness 0.4.13, lm_eval/tasks/ifeval/instructions_util.py (EleutherAI's copy of
# google-research instruction_following_eval/instructions_util.py), and modified for clearlm: see the
# package docstring in clearlm/eval/ifeval/__init__.py.

"""Utility library of instructions: word and sentence counting, language detection, and the optional
dependencies (nltk, langdetect and NLTK's punkt_tab data), loaded when first needed."""

from __future__ import annotations

import functools
import logging
from types import MappingProxyType, SimpleNamespace

from clearlm.errors import InputError

logger = logging.getLogger(__name__)

INSTALL_HINT = "ifeval needs the nltk and langdetect packages: pip install 'clearlm[ifeval]'"
PUNKT_MISSING = (
    "ifeval needs NLTK's punkt_tab sentence-splitter data, which clearlm does not ship: set NLTK_DATA to a folder "
    "that has tokenizers/punkt_tab (python -m nltk.downloader punkt_tab)"
)

# ISO 639-1 codes to language names.
LANGUAGE_CODES = MappingProxyType(
    {
        "en": "English",
        "es": "Spanish",
        "pt": "Portuguese",
        "ar": "Arabic",
        "hi": "Hindi",
        "fr": "French",
        "ru": "Russian",
        "de": "German",
        "ja": "Japanese",
        "it": "Italian",
        "bn": "Bengali",
        "uk": "Ukrainian",
        "th": "Thai",
        "ur": "Urdu",
        "ta": "Tamil",
        "te": "Telugu",
        "bg": "Bulgarian",
        "ko": "Korean",
        "pl": "Polish",
        "he": "Hebrew",
        "fa": "Persian",
        "vi": "Vietnamese",
        "ne": "Nepali",
        "sw": "Swahili",
        "kn": "Kannada",
        "mr": "Marathi",
        "gu": "Gujarati",
        "pa": "Punjabi",
        "ml": "Malayalam",
        "fi": "Finnish",
    }
)


@functools.cache
def dependencies() -> SimpleNamespace:
    """nltk, langdetect and NLTK's English Punkt sentence tokenizer, or an InputError saying how to get them.
    Nothing is downloaded: punkt_tab is looked up in NLTK's search path (NLTK_DATA first)."""
    try:
        import langdetect
        import nltk
    except ImportError as e:
        raise InputError(f"{INSTALL_HINT} ({e})") from e
    try:
        # what lm-eval's nltk.data.load("nltk:tokenizers/punkt/english.pickle") returns with nltk >= 3.9
        punkt = nltk.tokenize.PunktTokenizer("english")
    except LookupError:
        raise InputError(PUNKT_MISSING) from None
    # langdetect.detect's own factory, seeded: detection is random otherwise (unseeded in lm-eval), and a borderline
    # text's language must not change from one run to the next
    languages = langdetect.DetectorFactory()
    languages.load_profile(langdetect.detector_factory.PROFILES_DIRECTORY)
    languages.set_seed(0)
    return SimpleNamespace(nltk=nltk, langdetect=langdetect, punkt=punkt, languages=languages)


def count_words(text: str) -> int:
    """Counts the number of words."""
    tokenizer = dependencies().nltk.tokenize.RegexpTokenizer(r"\w+")
    tokens = tokenizer.tokenize(text)
    return len(tokens)


def count_sentences(text: str) -> int:
    """Count the number of sentences."""
    return len(dependencies().punkt.tokenize(text))


def word_tokenize(text: str) -> list[str]:
    """NLTK's word tokenizer (Treebank words within Punkt sentences)."""
    return dependencies().nltk.word_tokenize(text)


def detect_language(text: str) -> str | None:
    """langdetect's language code for the text, or None where langdetect cannot tell (the checkers then count the
    instruction as followed)."""
    found = dependencies()
    try:
        detector = found.languages.create()
        detector.append(text)
        return detector.detect()
    except found.langdetect.LangDetectException as e:
        logger.debug("Unable to detect language for text %r due to %s", text, e)
        return None
