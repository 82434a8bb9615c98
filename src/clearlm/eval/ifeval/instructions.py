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
# Ported from lm-evaluation-harness 0.4.13, lm_eval/tasks/ifeval/instructions.py (EleutherAI's copy of
# google-research instruction_following_eval/instructions.py), and modified for clearlm: see the package
# docstring in clearlm/eval/ifeval/__init__.py.

"""Library of instructions: each checker takes an IFEval row's kwargs in `build_description` and tells whether a
response follows the instruction in `check_following`."""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Sequence

from clearlm.errors import InputError
from clearlm.eval.ifeval import instructions_util

_LANGUAGES = instructions_util.LANGUAGE_CODES

# The relational operation for comparison.
_COMPARISON_RELATION = ("less than", "at least")

# The options of constrained response.
_CONSTRAINED_RESPONSE_OPTIONS = (
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
)


class Instruction:
    """An instruction template."""

    def __init__(self, instruction_id: str, rng: random.Random) -> None:
        self.id, self.rng = instruction_id, rng

    def build_description(self) -> None:
        """Set the instruction's arguments (upstream also returns the instruction's text, which scoring never
        uses). Instructions without arguments take none."""

    def check_following(self, value: str) -> bool:
        raise NotImplementedError("`check_following` not implemented.")

    def _missing(self, name: str, value: object) -> InputError:
        """Where upstream would draw a random value (and so score against an instruction the prompt never gave)."""
        return InputError(f"ifeval instruction {self.id}: argument {name} is missing or invalid ({value!r})")

    def _relation(self, name: str, relation: str | None) -> str:
        if relation not in _COMPARISON_RELATION:
            raise self._missing(name, relation)
        return relation


class ResponseLanguageChecker(Instruction):
    """Check the language of the entire response."""

    def build_description(self, *, language: str | None = None) -> None:
        if language not in _LANGUAGES:
            raise self._missing("language", language)
        self._language = language

    def check_following(self, value: str) -> bool:
        """Check if the language of the entire response follows the instruction."""
        detected = instructions_util.detect_language(value)
        # Count as instruction is followed where the language cannot be detected.
        return detected is None or detected == self._language


class NumberOfSentences(Instruction):
    """Check the number of sentences."""

    def build_description(self, *, num_sentences: int | None = None, relation: str | None = None) -> None:
        # The number of sentences as a threshold for comparison.
        if num_sentences is None or num_sentences < 0:
            raise self._missing("num_sentences", num_sentences)
        self._num_sentences_threshold = num_sentences
        self._comparison_relation = self._relation("relation", relation)

    def check_following(self, value: str) -> bool:
        """Check if the number of sentences follows the instruction."""
        num_sentences = instructions_util.count_sentences(value)
        if self._comparison_relation == _COMPARISON_RELATION[0]:
            return num_sentences < self._num_sentences_threshold
        return num_sentences >= self._num_sentences_threshold


class PlaceholderChecker(Instruction):
    """Check the placeholders in template writing."""

    def build_description(self, *, num_placeholders: int | None = None) -> None:
        if num_placeholders is None or num_placeholders < 0:
            raise self._missing("num_placeholders", num_placeholders)
        self._num_placeholders = num_placeholders

    def check_following(self, value: str) -> bool:
        """At least `num_placeholders` placeholders in square brackets, such as [address]."""
        placeholders = re.findall(r"\[.*?\]", value)
        num_placeholders = len(placeholders)
        return num_placeholders >= self._num_placeholders


class BulletListChecker(Instruction):
    """Checks the bullet list in the prompt."""

    def build_description(self, *, num_bullets: int | None = None) -> None:
        if num_bullets is None or num_bullets < 0:
            raise self._missing("num_bullets", num_bullets)
        self._num_bullets = num_bullets

    def check_following(self, value: str) -> bool:
        r"""Exactly `num_bullets` lines that start with `*` (not `**`) or `-`."""
        bullet_lists = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
        bullet_lists_2 = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
        num_bullet_lists = len(bullet_lists) + len(bullet_lists_2)
        return num_bullet_lists == self._num_bullets


class ConstrainedResponseChecker(Instruction):
    """Checks the constrained response."""

    def check_following(self, value: str) -> bool:
        """The response contains one of the options ("My answer is yes.", ...)."""
        value = value.strip()
        return any(constrained_response in value for constrained_response in _CONSTRAINED_RESPONSE_OPTIONS)


class HighlightSectionChecker(Instruction):
    """Checks the highlighted section."""

    def build_description(self, *, num_highlights: int | None = None) -> None:
        if num_highlights is None or num_highlights < 0:
            raise self._missing("num_highlights", num_highlights)
        self._num_highlights = num_highlights

    def check_following(self, value: str) -> bool:
        """At least `num_highlights` sections such as *highlighted section* (or **bold**, counted again)."""
        num_highlights = 0
        highlights = re.findall(r"\*[^\n\*]*\*", value)
        double_highlights = re.findall(r"\*\*[^\n\*]*\*\*", value)
        for highlight in highlights:
            if highlight.strip("*").strip():
                num_highlights += 1
        for highlight in double_highlights:
            if highlight.removeprefix("**").removesuffix("**").strip():
                num_highlights += 1

        return num_highlights >= self._num_highlights


class SectionChecker(Instruction):
    """Checks the sections."""

    def build_description(self, *, section_spliter: str | None = None, num_sections: int | None = None) -> None:
        self._section_spliter = section_spliter.strip() if isinstance(section_spliter, str) else section_spliter
        if self._section_spliter is None:
            raise self._missing("section_spliter", section_spliter)
        if num_sections is None or num_sections < 0:
            raise self._missing("num_sections", num_sections)
        self._num_sections = num_sections

    def check_following(self, value: str) -> bool:
        """At least `num_sections` sections, each starting with e.g. `Section 1` (the splitter is a regex)."""
        section_splitter_patten = r"\s?" + self._section_spliter + r"\s?\d+\s?"
        sections = re.split(section_splitter_patten, value)
        num_sections = len(sections) - 1
        return num_sections >= self._num_sections


class ParagraphChecker(Instruction):
    """Checks the paragraphs."""

    def build_description(self, *, num_paragraphs: int | None = None) -> None:
        if num_paragraphs is None or num_paragraphs < 0:
            raise self._missing("num_paragraphs", num_paragraphs)
        self._num_paragraphs = num_paragraphs

    def check_following(self, value: str) -> bool:
        """Exactly `num_paragraphs` paragraphs separated by the markdown divider `***`."""
        paragraphs = re.split(r"\s?\*\*\*\s?", value)
        num_paragraphs = len(paragraphs)

        for index, paragraph in enumerate(paragraphs):
            if not paragraph.strip():
                if index == 0 or index == len(paragraphs) - 1:
                    num_paragraphs -= 1
                else:
                    return False

        return num_paragraphs == self._num_paragraphs


class PostscriptChecker(Instruction):
    """Checks the postscript."""

    def build_description(self, *, postscript_marker: str | None = None) -> None:
        self._postscript_marker = postscript_marker.strip() if isinstance(postscript_marker, str) else postscript_marker
        if self._postscript_marker is None:
            raise self._missing("postscript_marker", postscript_marker)

    def check_following(self, value: str) -> bool:
        """A line with a postscript starting with the marker (P.S., P.P.S or another, matched as a regex)."""
        value = value.lower()
        if self._postscript_marker == "P.P.S":
            postscript_pattern = r"\s*p\.\s?p\.\s?s.*$"
        elif self._postscript_marker == "P.S.":
            postscript_pattern = r"\s*p\.\s?s\..*$"
        else:
            postscript_pattern = r"\s*" + self._postscript_marker.lower() + r".*$"
        postscript = re.findall(postscript_pattern, value, flags=re.MULTILINE)
        return bool(postscript)


class KeywordChecker(Instruction):
    """Check the existence of certain keywords."""

    def build_description(self, *, keywords: Sequence[str] | None = None) -> None:
        if not keywords:
            raise self._missing("keywords", keywords)
        self._keywords = sorted(keywords)

    def check_following(self, value: str) -> bool:
        """Check if the response contain the expected keywords (each a case-insensitive regex)."""
        return all(re.search(keyword, value, flags=re.IGNORECASE) for keyword in self._keywords)


class KeywordFrequencyChecker(Instruction):
    """Check the keyword frequency."""

    def build_description(
        self, *, keyword: str | None = None, frequency: int | None = None, relation: str | None = None
    ) -> None:
        if not keyword:
            raise self._missing("keyword", keyword)
        self._keyword = keyword.strip()
        if frequency is None or frequency < 0:
            raise self._missing("frequency", frequency)
        self._frequency = frequency
        self._comparison_relation = self._relation("relation", relation)

    def check_following(self, value: str) -> bool:
        """Checks if the response contain the keyword (a case-insensitive regex) with required frequency."""
        actual_occurrences = len(re.findall(self._keyword, value, flags=re.IGNORECASE))

        if self._comparison_relation == _COMPARISON_RELATION[0]:
            return actual_occurrences < self._frequency
        return actual_occurrences >= self._frequency


class NumberOfWords(Instruction):
    """Checks the number of words."""

    def build_description(self, *, num_words: int | None = None, relation: str | None = None) -> None:
        if num_words is None or num_words < 0:
            raise self._missing("num_words", num_words)
        self._num_words = num_words
        self._comparison_relation = self._relation("relation", relation)

    def check_following(self, value: str) -> bool:
        """Checks if the response contains the expected number of words."""
        num_words = instructions_util.count_words(value)

        if self._comparison_relation == _COMPARISON_RELATION[0]:
            return num_words < self._num_words
        return num_words >= self._num_words


class JsonFormat(Instruction):
    """Check the Json format."""

    def check_following(self, value: str) -> bool:
        """The response, less surrounding markdown ticks, parses as JSON."""
        value = (
            value.strip()
            .removeprefix("```json")
            .removeprefix("```Json")
            .removeprefix("```JSON")
            .removeprefix("```")
            .removesuffix("```")
            .strip()
        )
        try:
            json.loads(value)
        except ValueError:
            return False
        return True


class ParagraphFirstWordCheck(Instruction):
    """Check the paragraph and the first word of the nth paragraph."""

    def build_description(
        self, *, num_paragraphs: int | None = None, nth_paragraph: int | None = None, first_word: str | None = None
    ) -> None:
        if num_paragraphs is None or num_paragraphs < 0:
            raise self._missing("num_paragraphs", num_paragraphs)
        self._num_paragraphs = num_paragraphs
        if nth_paragraph is None or nth_paragraph <= 0 or nth_paragraph > self._num_paragraphs:
            raise self._missing("nth_paragraph", nth_paragraph)
        self._nth_paragraph = nth_paragraph
        if first_word is None:
            raise self._missing("first_word", first_word)
        self._first_word = first_word.lower()

    def check_following(self, value: str) -> bool:
        r"""Exactly `num_paragraphs` paragraphs separated by '\n\n', paragraph `nth_paragraph` starting with
        `first_word` (case-insensitive, leading quotes and trailing punctuation dropped)."""
        paragraphs = re.split(r"\n\n", value)
        num_paragraphs = len(paragraphs)

        for paragraph in paragraphs:
            if not paragraph.strip():
                num_paragraphs -= 1

        # check that index doesn't go out of bounds
        if self._nth_paragraph <= num_paragraphs:
            paragraph = paragraphs[self._nth_paragraph - 1].strip()
            if not paragraph:
                return False
        else:
            return False

        first_word = ""
        punctuation = {".", ",", "?", "!", "'", '"'}

        # get first word and remove punctuation
        word = paragraph.split()[0].strip()
        word = word.lstrip("'")
        word = word.lstrip('"')

        for letter in word:
            if letter in punctuation:
                break
            first_word += letter.lower()

        return num_paragraphs == self._num_paragraphs and first_word == self._first_word


class ForbiddenWords(Instruction):
    """Checks that specified words are not used in response."""

    def build_description(self, *, forbidden_words: Sequence[str] | None = None) -> None:
        if not forbidden_words:
            raise self._missing("forbidden_words", forbidden_words)
        self._forbidden_words = sorted(set(forbidden_words))

    def check_following(self, value: str) -> bool:
        """Check if the response does not contain the words (each a case-insensitive regex within \\b)."""
        return not any(re.search(r"\b" + word + r"\b", value, flags=re.IGNORECASE) for word in self._forbidden_words)


class TwoResponsesChecker(Instruction):
    """Check that two responses were given."""

    def check_following(self, value: str) -> bool:
        """Two different responses separated by ******."""
        valid_responses = []
        responses = value.split("******")
        for index, response in enumerate(responses):
            if not response.strip():
                if index != 0 and index != len(responses) - 1:
                    return False
            else:
                valid_responses.append(response)
        return len(valid_responses) == 2 and valid_responses[0].strip() != valid_responses[1].strip()


class RepeatPromptThenAnswer(Instruction):
    """Checks that Prompt is first repeated then answered."""

    def build_description(self, *, prompt_to_repeat: str | None = None) -> None:
        if not prompt_to_repeat:
            raise self._missing("prompt_to_repeat", prompt_to_repeat)
        self._prompt_to_repeat = prompt_to_repeat

    def check_following(self, value: str) -> bool:
        """The response starts with the prompt to repeat (case-insensitive)."""
        return value.strip().lower().startswith(self._prompt_to_repeat.strip().lower())


class EndChecker(Instruction):
    """Checks that the prompt ends with a given phrase."""

    def build_description(self, *, end_phrase: str | None = None) -> None:
        self._end_phrase = end_phrase.strip() if isinstance(end_phrase, str) else end_phrase
        if self._end_phrase is None:
            raise self._missing("end_phrase", end_phrase)

    def check_following(self, value: str) -> bool:
        """Checks if the response ends with the expected phrase (case-insensitive, double quotes stripped)."""
        value = value.strip().strip('"').lower()
        self._end_phrase = self._end_phrase.strip().lower()
        return value.endswith(self._end_phrase)


class TitleChecker(Instruction):
    """Checks the response for a title."""

    def check_following(self, value: str) -> bool:
        """Checks if the response contains a title, such as <<poem of joy>>."""
        pattern = r"<<[^\n]+>>"
        re_pattern = re.compile(pattern)
        titles = re.findall(re_pattern, value)

        return any(title.lstrip("<").rstrip(">").strip() for title in titles)


class LetterFrequencyChecker(Instruction):
    """Checks letter frequency."""

    def build_description(
        self, *, letter: str | None = None, let_frequency: int | None = None, let_relation: str | None = None
    ) -> None:
        # As upstream: a letter that is not one ASCII letter (IFEval has "#" and "!") is replaced by a random one,
        # drawn from the scorer's generator (lm-eval draws from Python's global `random`, seeded 0 before a run).
        if not letter or len(letter) > 1 or ord(letter.lower()) < 97 or ord(letter.lower()) > 122:
            self._letter = self.rng.choice(list(string.ascii_letters))
        else:
            self._letter = letter.strip()
        self._letter = self._letter.lower()

        if let_frequency is None or let_frequency < 0:
            raise self._missing("let_frequency", let_frequency)
        self._frequency = let_frequency
        self._comparison_relation = self._relation("let_relation", let_relation)

    def check_following(self, value: str) -> bool:
        """Checks that the response contains the letter (case-insensitive) at the right frequency."""
        value = value.lower()
        letters = collections.Counter(value)

        if self._comparison_relation == _COMPARISON_RELATION[0]:
            return letters[self._letter] < self._frequency
        return letters[self._letter] >= self._frequency


class CapitalLettersEnglishChecker(Instruction):
    """Checks that the response is in english and is in all capital letters."""

    def check_following(self, value: str) -> bool:
        """Checks that the response is in English and in all capital letters."""
        if not value.isupper():
            return False
        detected = instructions_util.detect_language(value)
        # Count as instruction is followed where the language cannot be detected.
        return detected is None or detected == "en"


class LowercaseLettersEnglishChecker(Instruction):
    """Checks that the response is in english and is in all lowercase letters."""

    def check_following(self, value: str) -> bool:
        """Checks that the response is in English and in all lowercase letters."""
        if not value.islower():
            return False
        detected = instructions_util.detect_language(value)
        # Count as instruction is followed where the language cannot be detected.
        return detected is None or detected == "en"


class CommaChecker(Instruction):
    """Checks the response for no commas."""

    def check_following(self, value: str) -> bool:
        """Checks that the response does not contain commas."""
        return not re.search(r"\,", value)


class CapitalWordFrequencyChecker(Instruction):
    """Checks frequency of words with all capital letters."""

    def build_description(self, *, capital_frequency: int | None = None, capital_relation: str | None = None) -> None:
        if capital_frequency is None:
            raise self._missing("capital_frequency", capital_frequency)
        self._frequency = capital_frequency
        self._comparison_relation = self._relation("capital_relation", capital_relation)

    def check_following(self, value: str) -> bool:
        """Checks the frequency of words (NLTK word tokens) with all capital letters."""
        # Hyphenated words will count as one word
        words = instructions_util.word_tokenize(value)
        capital_words = len([word for word in words if word.isupper()])

        if self._comparison_relation == _COMPARISON_RELATION[0]:
            return capital_words < self._frequency
        return capital_words >= self._frequency


class QuotationChecker(Instruction):
    """Checks response is wrapped with double quotation marks."""

    def check_following(self, value: str) -> bool:
        """Checks if the response is wrapped with double quotation marks."""
        value = value.strip()
        return len(value) > 1 and value[0] == '"' and value[-1] == '"'
