"""Language identification with py3langid (an offline model shipped inside the PyPI package)."""

from __future__ import annotations

from clearlm.data.documents import Document
from clearlm.data.steps import Removed, Result
from clearlm.errors import RecipeError
from clearlm.recipe import LanguageConfig


class IdentifyLanguage:
    def __init__(self, cfg: LanguageConfig) -> None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise RecipeError("the language step needs py3langid: pip install py3langid") from None
        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.keep = set(cfg.languages)
        self.min_score = cfg.min_score

    def __call__(self, doc: Document) -> Result:
        language, score = self.identifier.classify(doc["text"].replace("\n", " "))
        score = float(score)
        if self.keep and language not in self.keep:
            return Removed(f"language_{language}")
        if score < self.min_score:
            return Removed("language_score_below_threshold")
        return {**doc, "metadata": {**doc["metadata"], "language": language, "language_score": round(score, 4)}}
