"""PII masking with Dolma's replacement tokens, counted per kind for the data card."""

from __future__ import annotations

import re

from clearlm.data.documents import Document
from clearlm.data.steps import Counted, Result
from clearlm.recipe import PIIConfig

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PATTERNS = {
    "email": (re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
              "|||EMAIL_ADDRESS|||"),
    # not inside a longer dotted number (1.2.3.4.5), but a sentence's full stop may follow
    "ip": (re.compile(rf"(?<!\w)(?<!\d\.)(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)"), "|||IP_ADDRESS|||"),
    "phone": (re.compile(r"(?<![\w+])(?:\+?1[-. ])?\(?\d{3}\)?[-. ]\d{3}[-. ]\d{4}(?!\w)"), "|||PHONE_NUMBER|||"),
}  # fmt: skip


class MaskPII:
    """A step that replaces each match and says how many of each kind it replaced."""

    def __init__(self, cfg: PIIConfig) -> None:
        self.kinds = [k for k in PATTERNS if getattr(cfg, k)]

    def __call__(self, doc: Document) -> Result:
        text, counts = doc["text"], {}
        for kind in self.kinds:
            pattern, token = PATTERNS[kind]
            text, n = pattern.subn(token, text)
            if n:
                counts[kind] = n
        return Counted({**doc, "text": text}, counts) if counts else doc
