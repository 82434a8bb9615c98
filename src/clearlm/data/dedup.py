"""Deduplication: a key per document (computed in the workers) and a decision over the whole corpus.

A dedup step's verdict on a document depends on every other document, so it is split in two: the
worker computes the document's key where the step stands in the recipe (`ExactDedup.key`,
`MinHashDedup.key`), and `resolve` decides, once all keys are in, which documents go. The first
document (in corpus order) of each group is the one kept, on any number of workers or machines.

MinHash signatures are datatrove's (`MinhashDedupSignature`, FineWeb's settings), transcribed so the
near-duplicate clusters are the same as datatrove's: text simplified as `simplify_text` does, split
into words by spaCy, word n-grams hashed with xxhash64, then `(a * h + b) mod (2^61 - 1)` with
parameters drawn from numpy's `RandomState(seed)`, with numpy's 64-bit wrap-around. datasketch
masks its hashes to 32 bits and so cannot reproduce these signatures; xxhash and numpy are the
libraries underneath. Documents sharing all rows of any band are linked, and the clusters are the
connected components (union-find), as in datatrove's `MinhashDedupCluster`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict

import numpy as np

from clearlm.data.documents import Document
from clearlm.errors import RecipeError
from clearlm.recipe import ExactDedupConfig, MinHashDedupConfig

# datatrove.utils.text.PUNCTUATION (what simplify_text turns into spaces)
_PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)))
)
_TO_SPACE = str.maketrans(_PUNCTUATION, " " * len(_PUNCTUATION))
_NUMBERS = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")  # str patterns: \d is every Unicode Nd digit, like \p{Nd}
_SPACES = re.compile(r"\s+")
_MERSENNE = np.uint64((1 << 61) - 1)


def simplify(text: str) -> str:
    """datatrove's `simplify_text` with its defaults: lower case, numbers to 0, punctuation to spaces,
    whitespace collapsed, combining marks removed."""
    text = _NUMBERS.sub("0", text.lower()).translate(_TO_SPACE)
    text = _SPACES.sub(" ", text.strip())
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.strip()


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class ExactDedup:
    """Drops documents whose text equals an earlier one's after lower-casing and collapsing spaces."""

    reason = "exact_duplicate"

    def __init__(self, cfg: ExactDedupConfig) -> None:
        self.cfg = cfg

    def key(self, doc: Document) -> int:
        return _digest(" ".join(doc["text"].lower().split()).encode())

    def resolve(self, indices: np.ndarray, keys: np.ndarray) -> tuple[dict[int, int], Counter[str]]:
        """{document: the earlier document it duplicates}, by corpus index (`indices` ascending)."""
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        original = indices[first[inverse.ravel()]]
        duplicate = original != indices
        return dict(zip(indices[duplicate].tolist(), original[duplicate].tolist(), strict=True)), Counter()


class MinHashDedup:
    """Drops all but the first document of each near-duplicate cluster; counts clusters by size."""

    reason = "near_duplicate"

    def __init__(self, cfg: MinHashDedupConfig) -> None:
        try:
            import xxhash
        except ImportError:
            raise RecipeError("the minhash_dedup step needs xxhash: pip install xxhash") from None
        from clearlm.data.text import english

        self.cfg, self._xxh64, self._words = cfg, xxhash.xxh64_intdigest, english().words
        gen = np.random.RandomState(cfg.seed)
        n = cfg.bands * cfg.rows
        self._a = gen.randint(1, _MERSENNE, dtype=np.uint64, size=(1, n))
        self._b = gen.randint(0, _MERSENNE, dtype=np.uint64, size=(1, n))

    def signature(self, text: str) -> np.ndarray | None:
        """The (bands x rows) MinHash signature, or None for a text shorter than one n-gram."""
        words, n = self._words(simplify(text)), self.cfg.ngram
        if len(words) < n:
            return None
        shingles = np.fromiter(
            (self._xxh64(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)), dtype=np.uint64
        ).reshape(-1, 1)
        with np.errstate(over="ignore"):
            hashes = (shingles * self._a + self._b) % _MERSENNE
        return hashes.min(axis=0).reshape(self.cfg.bands, self.cfg.rows)

    def key(self, doc: Document) -> list[int] | None:
        """A 64-bit digest per band: two documents share a band when their digests are equal."""
        sig = self.signature(doc["text"])
        return None if sig is None else [_digest(band.tobytes()) for band in sig]

    def clusters(self, indices: np.ndarray, keys: np.ndarray) -> list[list[int]]:
        """Connected components of more than one document sharing a band, as sorted corpus indices."""
        parent: dict[int, int] = {}

        def root(x: int) -> int:
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for band in range(keys.shape[1] if len(keys) else 0):
            order = np.argsort(keys[:, band], kind="stable")
            column = keys[order, band]
            for j in np.flatnonzero(column[1:] == column[:-1]).tolist():
                a, b = root(int(indices[order[j]])), root(int(indices[order[j + 1]]))
                if a != b:  # the smaller index is the root: the first document of a cluster is kept
                    parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = defaultdict(list)
        for x in sorted(parent):
            groups[root(x)].append(x)
        return sorted(groups.values())

    def resolve(self, indices: np.ndarray, keys: np.ndarray) -> tuple[dict[int, int], Counter[str]]:
        """{document: the first document of its cluster}, by corpus index, and clusters by size."""
        groups = self.clusters(indices, keys)
        removed = {index: group[0] for group in groups for index in group[1:]}
        sizes = Counter(len(group) for group in groups)
        sizes[1] = len(indices) - sum(len(group) for group in groups)
        return removed, Counter({f"clusters of {size}": n for size, n in sorted(sizes.items()) if n})


DedupStep = ExactDedup | MinHashDedup
