"""Near-duplicate removal: MinHash signatures (datasketch) indexed with LSH bands.

Text is simplified as datatrove's MinHash step does before shingling (lower case, digits to 0,
punctuation to spaces, whitespace collapsed), then hashed as word n-grams. Documents are streamed in
corpus order and a document is dropped when the index already holds a near-duplicate of it, so the
first member of every cluster is the one kept, whatever the machine. (datatrove instead clusters all
documents first with union-find; on chains A~B~C where A and C are not similar, it also drops C.)
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from clearlm.data.documents import Document
from clearlm.data.steps import PUNCTUATION_SET, Removed, Result
from clearlm.errors import RecipeError
from clearlm.recipe import MinHashDedupStep

_DIGITS = re.compile(r"\d+")
_SPACES = re.compile(r"\s+")
_TO_SPACE = str.maketrans(dict.fromkeys(PUNCTUATION_SET, " "))


def simplify(text: str) -> str:
    text = _DIGITS.sub("0", text.lower()).translate(_TO_SPACE)
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return _SPACES.sub(" ", text.strip())


class MinHashDedup:
    """A step that keeps the first document of each near-duplicate cluster; counts cluster sizes."""

    def __init__(self, cfg: MinHashDedupStep) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise RecipeError("the minhash_dedup step needs datasketch: pip install datasketch") from None
        self.cfg, self._minhash = cfg, MinHash
        self.num_perm = cfg.bands * cfg.rows
        self.index = MinHashLSH(num_perm=self.num_perm, params=(cfg.bands, cfg.rows))
        self.cluster_sizes: Counter[str] = Counter()

    def signature(self, text: str):
        words = simplify(text).split(" ")
        n = self.cfg.ngram
        shingles = {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        sig = self._minhash(num_perm=self.num_perm, seed=self.cfg.seed)
        sig.update_batch(sorted(shingles))
        return sig

    @property
    def counts(self) -> dict[str, int]:
        """Number of clusters by size (documents in the cluster, the kept one included)."""
        sizes = Counter(self.cluster_sizes.values())
        return {f"clusters of {size}": n for size, n in sorted(sizes.items())}

    def __call__(self, doc: Document) -> Result:
        sig = self.signature(doc["text"])
        hits = self.index.query(sig)
        if hits:
            kept = min(hits)
            self.cluster_sizes[kept] += 1
            return Removed("near_duplicate")
        self.index.insert(doc["id"], sig)
        self.cluster_sizes[doc["id"]] = 1
        return doc
