"""Licences: normalise what people write to SPDX ids, and say whether a licence is open, and for what.

Normalisation uses `license-expression` (ScanCode's licence index, bundled, offline), plus a table
for the names the Hugging Face Hub uses that are not SPDX ids (Llama, Gemma, RAIL licences, ...).
Openness follows the Model Openness Tool (MOT): a licence is open when it is OSI-approved,
FSF-libre, or on MOT's list of open data licences, matched by exact SPDX id. The lists below are
data from those sources, kept in `license_lists.toml`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

_LISTS = tomllib.loads((Path(__file__).parent / "license_lists.toml").read_text())
OSI_APPROVED = frozenset(_LISTS["osi_approved"]) | frozenset(_LISTS["osi_approved_deprecated"])
FSF_LIBRE = frozenset(_LISTS["fsf_libre"])
OPEN_DATA = frozenset(_LISTS["open_data"])

# Open content licences for documents (Creative Commons attribution / share-alike / zero, GFDL).
_CONTENT_PREFIXES = ("CC-BY-", "CC0-", "GFDL-", "FreeBSD-DOC", "CC-PDDC")

# Hugging Face Hub licence names that are not SPDX ids -> ScanCode keys (None: no known text).
_HF_NAMES: dict[str, str | None] = {
    "llama2": "llama-2-license-2023", "llama3": None, "llama3.1": "llama-3.1-license-2024",
    "llama3.2": "llama-3.2-license-2024", "llama3.3": "llama-3.3-license-2024", "llama4": "llama-4-license-2025",
    "gemma": "gemma-tou-2024-04-01", "bigscience-openrail-m": "bigscience-open-rail-m",
    "bigscience-bloom-rail-1.0": "bigscience-rail-1.0", "bigcode-openrail-m": "bigcode-open-rail-m-v1",
    "creativeml-openrail-m": "stable-diffusion-2022-08-22", "openrail": None, "openrail++": None, "other": None,
}  # fmt: skip
_ALIASES = {
    "apache 2.0": "Apache-2.0", "apache license 2.0": "Apache-2.0", "apache2": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0", "mit license": "MIT", "odc-by": "ODC-By-1.0", "odbl": "ODbL-1.0",
    "pddl": "PDDL-1.0", "c-uda": "C-UDA-1.0", "psf": "PSF-2.0", "python": "Python-2.0",
}  # fmt: skip
_RESTRICTIVE_CATEGORIES = {"Proprietary Free", "Source-available", "Commercial", "Free Restricted", "Non-Commercial"}
_RESTRICTIVE_WORDS = ("llama", "gemma", "rail", "-nc-", "-nc", "noncommercial", "non-commercial", "research")

Kind = Literal["osi-approved", "open-data", "open-content", "permissive", "restrictive", "unknown", "none"]


@dataclass(frozen=True)
class License:
    raw: str
    spdx: str | None  # SPDX id or expression, or LicenseRef-scancode-...; None when not recognised
    kind: Kind

    @property
    def is_open(self) -> bool:
        return self.spdx is not None and is_open(self.spdx)


@functools.cache
def _index() -> tuple[Any, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    from license_expression import get_license_index, get_spdx_licensing

    index = get_license_index()
    by_key = {e["license_key"]: e for e in index}
    by_spdx = {k.lower(): e for e in index for k in filter(None, [e.get("spdx_license_key"),
                                                                   *e.get("other_spdx_license_keys", [])])}  # fmt: skip
    return get_spdx_licensing(), by_key, by_spdx


def _ids(expression: str) -> list[str]:
    licensing = _index()[0]
    return licensing.license_keys(licensing.parse(expression))


def is_open(spdx: str) -> bool:
    """MOT's test, per licence of an expression: OSI-approved, FSF-libre or an open data licence."""
    try:
        ids = _ids(spdx)
    except Exception:
        return False
    return bool(ids) and all(i in OSI_APPROVED or i in FSF_LIBRE or i in OPEN_DATA for i in ids)


def fits(spdx: str, content: Literal["code", "data", "document"]) -> bool:
    """An open licence of the right type: OSI-approved for code, open data for data and parameters,
    open content for documents."""
    try:
        ids = _ids(spdx)
    except Exception:
        return False
    if content == "code":
        return bool(ids) and all(i in OSI_APPROVED for i in ids)
    if content == "data":
        return bool(ids) and all(i in OPEN_DATA or i.startswith(("CDLA-", "CC0-", "PDDL-")) for i in ids)
    return bool(ids) and all(i.startswith(_CONTENT_PREFIXES) or i in OPEN_DATA for i in ids)


def normalize(raw: str | None) -> License:
    """SPDX id (or expression) for a licence name as found in a LICENSE file, model card or recipe."""
    if raw is None or not str(raw).strip():
        return License(str(raw or ""), None, "none")
    text = str(raw).strip()
    licensing, by_key, by_spdx = _index()
    low = text.lower()
    if low in _HF_NAMES:
        key = _HF_NAMES[low]
        spdx = by_key[key]["spdx_license_key"] if key and key in by_key else None
        kind: Kind = "restrictive" if low != "other" else "unknown"
        return License(text, spdx, kind)
    try:
        info = licensing.validate(_ALIASES.get(low, text))
    except Exception:  # license-expression fails on some malformed strings instead of reporting them
        info = None
    if info is None or not info.normalized_expression:
        restrictive = any(w in low for w in _RESTRICTIVE_WORDS)
        return License(text, None, "restrictive" if restrictive else "unknown")
    spdx = info.normalized_expression
    return License(text, spdx, _kind(spdx, by_spdx))


def _kind(spdx: str, by_spdx: dict[str, dict[str, Any]]) -> Kind:
    ids = _ids(spdx)
    if all(i in OSI_APPROVED for i in ids):
        return "osi-approved"
    if all(i in OPEN_DATA or i.startswith(("CDLA-", "PDDL-")) for i in ids):
        return "open-data"
    if all(i.startswith(_CONTENT_PREFIXES) for i in ids) and is_open(spdx):
        return "open-content"
    categories = {by_spdx.get(i.lower(), {}).get("category") for i in ids}
    if categories & _RESTRICTIVE_CATEGORIES or any(w in spdx.lower() for w in ("-nc-", "-nd-")):
        return "restrictive"
    return "permissive" if categories <= {"Permissive", "Public Domain"} else "unknown"
