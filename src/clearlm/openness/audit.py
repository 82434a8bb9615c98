"""`clearlm audit`: how open any model folder is, and whether it holds anything unsafe.

Only reads bytes: nothing from the folder is imported, unpickled or executed. Pickle files are
scanned by opcode with picklescan (the globals a pickle would import are listed, never resolved);
archives are listed, not extracted; symlinks are resolved as paths, not followed while walking.
Weights files are hashed in 1 MiB blocks. Components are recognised by file names and layout
(Hugging Face folders, clearlm releases, git checkouts), licences from LICENSE files, the model
card's `license:`, `SPDX-License-Identifier:` headers and, when the folder has one, its MOT file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from fnmatch import translate
from pathlib import Path
from typing import Any

import yaml

from clearlm.artifacts import sha256_file
from clearlm.errors import InputError
from clearlm.openness.licenses import normalize
from clearlm.openness.mof import BY_NAME, COMPONENTS, evaluate, from_mot, validate_mot
from clearlm.openness.osaid import osaid_checklist

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules"}
_ID = r"[A-Za-z0-9][A-Za-z0-9.+-]*"
_HEADER = re.compile(rf"SPDX-License-Identifier: ({_ID}(?: (?:AND|OR|WITH) {_ID})*)")

# (component, patterns on the path relative to the folder); a component is present when any matches.
_EVIDENCE: list[tuple[str, tuple[str, ...]]] = [
    ("Model architecture", ("modeling_*.py", "*/model/*.py", "*model*.py")),
    ("Data preprocessing code", ("*/data/*.py", "*preprocess*.py", "*tokeniz*.py", "*dedup*.py")),
    ("Training code", ("*/train/*.py", "train*.py", "*trainer*.py", "*pretrain*.py")),
    ("Inference code", ("*generate*.py", "*inference*.py", "modeling_*.py", "*/serve/*.py")),
    ("Evaluation code", ("*/eval/*.py", "eval*.py", "*evaluat*.py")),
    ("Supporting libraries and tools", ("requirements*.txt", "*/requirements*.txt", "pyproject.toml",
                                        "setup.py", "environment.yml")),
    ("Model parameters (Final)", ("*.safetensors", "pytorch_model*.bin", "*.gguf", "model*.pt", "*.index.json")),
    ("Model parameters (Intermediate)", ("checkpoints/*", "checkpoint-*/*", "step*/*.safetensors", "revisions/*")),
    ("Datasets", ("data/datasets/*", "datasets/*", "*.parquet", "*train*.jsonl*", "*.arrow")),
    ("Evaluation data", ("eval/samples.jsonl", "eval*/data/*", "*eval*.jsonl*", "*validation*.jsonl*")),
    ("Model metadata", ("config.json", "generation_config.json", "*params.json")),
    ("Sample model outputs", ("*generation*.jsonl", "*samples*.jsonl", "*outputs*.jsonl")),
    ("Model card", ("README.md", "MODEL_CARD.md", "model_card.md")),
    ("Data card", ("*data_card*.md", "*DATA_CARD*", "*datasheet*", "*dataset_card*.md")),
    ("Technical report", ("report.html", "*technical_report*", "*tech_report*", "*report*.pdf")),
    ("Research paper", ("*paper*.pdf", "*paper*.md", "*arxiv*.pdf", "*.tex")),
    ("Evaluation results", ("eval/results.json", "*results*.json", "*eval*results*.md")),
]  # fmt: skip
_EXTRA = {"tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken"),
          "logs": ("*.log", "training/*.jsonl", "*log.jsonl", "*events.out.tfevents*", "logs/*")}  # fmt: skip

# each list of patterns as one compiled expression: a folder of a million files is matched in seconds
_EVIDENCE_RE = [(c, re.compile("|".join(map(translate, ps))).match) for c, ps in _EVIDENCE]
_EXTRA_RE = [(k, re.compile("|".join(map(translate, ps))).match) for k, ps in _EXTRA.items()]

# Licence texts recognised in LICENSE/COPYING files by a phrase each (first match wins).
_TEXTS = [
    (r"Apache License\s+Version 2\.0", "Apache-2.0"), (r"Permission is hereby granted, free of charge", "MIT"),
    (r"GNU AFFERO GENERAL PUBLIC LICENSE\s+Version 3", "AGPL-3.0-only"),
    (r"GNU LESSER GENERAL PUBLIC LICENSE\s+Version 3", "LGPL-3.0-only"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 3", "GPL-3.0-only"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 2", "GPL-2.0-only"),
    (r"Mozilla Public License,? [Vv]ersion 2\.0", "MPL-2.0"),
    (r"Community Data License Agreement\W+Permissive\W+Version 2\.0", "CDLA-Permissive-2.0"),
    (r"Attribution-NonCommercial", "CC-BY-NC-4.0"), (r"Attribution-ShareAlike 4\.0 International", "CC-BY-SA-4.0"),
    (r"Attribution 4\.0 International", "CC-BY-4.0"), (r"CC0 1\.0 Universal", "CC0-1.0"),
    (r"LLAMA 3\.1 COMMUNITY LICENSE", "llama3.1"), (r"LLAMA 3\.2 COMMUNITY LICENSE", "llama3.2"),
    (r"LLAMA 2 COMMUNITY LICENSE", "llama2"), (r"Gemma Terms of Use", "gemma"),
    (r"BigScience RAIL License|OpenRAIL", "openrail"),
    (r"Redistribution and use in source and binary forms.*Neither the name", "BSD-3-Clause"),
    (r"Redistribution and use in source and binary forms", "BSD-2-Clause"),
    (r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2", "Python-2.0"),
]  # fmt: skip


MAX_PARSED = 4 << 20  # config, card front matter and MOT files larger than this are not parsed
MAX_LISTED = 256 << 20  # uncompressed bytes a tar archive is read through to list its members
MAX_MEMBERS = 100_000


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors' aliases: none of the files audited needs them, and a "billion laughs" document
    of nested aliases is small on disk but explodes when the report is written out."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not accepted")
        return super().compose_node(parent, index)


def _parse(path: Path, text: str | None = None) -> Any:
    """A YAML or JSON file's content, read only up to MAX_PARSED; ValueError when it is too large, too deep,
    or not valid."""
    if text is None:
        if path.stat().st_size > MAX_PARSED:
            raise ValueError(f"larger than {MAX_PARSED >> 20} MiB, not parsed")
        text = path.read_text(errors="replace")
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_NoAliases)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
    except yaml.YAMLError as e:
        raise ValueError(f"invalid YAML ({e})") from None


def _regular(path: Path) -> bool:
    """A regular file, not a symlink, FIFO, socket or device (reading those could hang or leave the folder)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    for base, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not Path(base, d).is_symlink())
        for name in sorted(files):
            path = Path(base, name)
            if _regular(path):
                yield path.relative_to(root).as_posix(), path


def _inside(root: Path, where: str) -> bool:
    """A declared path that exists inside the folder (absolute paths, `..` and symlinks do not count)."""
    path = root / where
    if Path(where).is_absolute() or ".." in Path(where).parts or not path.exists():
        return False
    return path.resolve().is_relative_to(root.resolve()) and not any(
        p.is_symlink() for p in [path, *path.parents] if p.is_relative_to(root) and p != root
    )


def _symlinks(root: Path) -> list[dict[str, str]]:
    found = []
    real_root = root.resolve()
    for base, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in [*dirs, *files]:
            path = Path(base, name)
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(real_root):
                    found.append({"path": path.relative_to(root).as_posix(), "kind": "symlink-escape",
                                  "detail": f"points outside the folder, to {target}"})  # fmt: skip
    return found


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def _scan_pickle(rel: str, path: Path) -> list[dict[str, str]]:
    from picklescan.scanner import SafetyLevel, scan_file_path

    logging.getLogger("picklescan").setLevel(logging.ERROR)
    try:
        result = scan_file_path(str(path))
    except Exception as e:  # a truncated zip or malformed pickle: cannot be vouched for
        return [{"path": rel, "kind": "unscannable-pickle", "detail": f"{type(e).__name__}: {e}"}]
    dangerous = sorted({f"{g.module}.{g.name}" for g in result.globals if g.safety is SafetyLevel.Dangerous})
    suspicious = sorted({f"{g.module}.{g.name}" for g in result.globals if g.safety is SafetyLevel.Suspicious})
    out = []
    if dangerous:
        out.append({"path": rel, "kind": "dangerous-pickle", "detail": "imports " + ", ".join(dangerous)})
    if suspicious:
        out.append({"path": rel, "kind": "suspicious-pickle", "detail": "imports " + ", ".join(suspicious)})
    if not out and result.globals:
        out.append({"path": rel, "kind": "pickle", "detail": "pickle-based weights (safe imports only); "
                    "prefer safetensors"})  # fmt: skip
    return out


def _archive_members(rel: str, path: Path) -> list[dict[str, str]]:
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                for m in t:  # a compressed tar is decompressed to be listed: a bomb stops the listing
                    if len(names) >= MAX_MEMBERS or m.offset_data > MAX_LISTED:
                        return [{"path": rel, "kind": "unlisted-archive", "detail": f"listing stopped after "
                                 f"{len(names)} members and {m.offset_data >> 20} MiB (a decompression bomb?): its "
                                 "other members are unchecked"}]  # fmt: skip
                    names.append(m.name)
                    if (m.issym() or m.islnk()) and (m.linkname.startswith("/") or ".." in Path(m.linkname).parts):
                        names.append(m.linkname)
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        return [{"path": rel, "kind": "unreadable-archive", "detail": str(e)}]
    bad = [n for n in names if n.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", n) or ".." in re.split(r"[/\\]", n)]
    return [{"path": rel, "kind": "archive-path-escape", "detail": f"member {n!r} would be written outside"}
            for n in bad[:5]]  # fmt: skip


def _remote_code(root: Path) -> list[dict[str, str]]:
    """Python files that transformers would run with trust_remote_code=True (config.json's auto_map)."""
    config = root / "config.json"
    if not _regular(config):
        return []
    try:
        auto_map = _parse(config).get("auto_map") or {}
    except AttributeError:
        return []
    except ValueError as e:  # too large or too deep to look for auto_map in: cannot be vouched for
        return [{"path": "config.json", "kind": "unscannable-config", "detail": f"{e}: remote code not checked"}]
    modules = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in auto_map.values() for v in (v if isinstance(
        v, list) else [v]) if v}  # fmt: skip
    return [{"path": f"{m.replace('.', '/')}.py", "kind": "remote-code",
             "detail": "runs when loaded with trust_remote_code=True"} for m in sorted(modules)]  # fmt: skip


def _card_front_matter(root: Path) -> dict[str, Any]:
    card = root / "README.md"
    if not _regular(card):
        return {}
    with open(card, encoding="utf-8", errors="replace") as f:
        text = f.read(MAX_PARSED)  # front matter opens the card
    if not text.startswith("---"):
        return {}
    try:
        meta = _parse(card, text.split("---", 2)[1])
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_licence_file(name: str) -> bool:
    stem, _, ext = name.partition(".")
    return stem.split("-")[0] in ("license", "licence", "copying") and ext in ("", "md", "txt", "rst")


def _licence_file(path: Path) -> str | None:
    text = path.read_text(errors="replace")[:20000]
    for pattern, spdx in _TEXTS:
        if re.search(pattern, text, re.S | re.I):
            return spdx
    return None


def audit_folder(folder: Path) -> dict[str, Any]:
    """The audit report of a local folder (a dict, also what `--json` writes)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = list(_walk(root))
    unsafe = _symlinks(root) + _remote_code(root)
    present: dict[str, list[str]] = {}
    extra: dict[str, list[str]] = {}
    licences: list[dict[str, Any]] = []
    weights: list[dict[str, Any]] = []
    for rel, path in files:
        if path.is_symlink():
            continue
        name = path.name.lower()
        for comp, matches in _EVIDENCE_RE:
            if matches(rel):
                present.setdefault(comp, []).append(rel)
        for kind, matches in _EXTRA_RE:
            if matches(rel):
                extra.setdefault(kind, []).append(rel)
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES or (suffix not in (".safetensors", ".json", ".md", ".txt", ".py")
                                         and path.stat().st_size > 0 and _looks_like_pickle(path)):  # fmt: skip
            unsafe += [f for f in _scan_pickle(rel, path) if f["kind"] != "pickle"]
        if name.endswith(ARCHIVE_SUFFIXES) or (suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(path)):
            unsafe += _archive_members(rel, path)
        if suffix in WEIGHT_SUFFIXES:
            weights.append({"path": rel, "format": suffix.lstrip("."), "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})  # fmt: skip
        if _is_licence_file(name) and path.stat().st_size < 1 << 20:
            found = _licence_file(path)
            licences.append({"where": rel, "from": "licence file", **_licence(found or "unrecognised text")})
        elif suffix in (".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".sh") and path.stat().st_size < 1 << 22:
            with open(path, encoding="utf-8", errors="replace") as f:
                match = _HEADER.search(f.read(4096))
            if match:
                licences.append({"where": rel, "from": "SPDX header", **_licence(match.group(1))})
    meta = _card_front_matter(root)
    if meta.get("license"):
        raw = meta.get("license_name") if meta["license"] == "other" and meta.get("license_name") else meta["license"]
        licences.append({"where": "README.md", "from": "model card license:", **_licence(str(raw))})
    if meta.get("model-index"):
        present.setdefault("Evaluation results", []).append("README.md (model-index)")
    if "Model card" in present and not meta:
        present["Model card"] = [p for p in present["Model card"] if p != "README.md"]
        present = {k: v for k, v in present.items() if v}
    declared = _declared(root, files)
    for name, entry in (declared[1] if declared else {}).items():
        where = str(entry.get("component_path") or "")
        if name in BY_NAME and where and name not in present and _inside(root, where):
            present[name] = [f"{where} (declared in {declared[0]})"]
    evaluation = evaluate(_component_licences(present, licences, declared))
    return {
        "folder": str(root), "files": len(files), "mof": evaluation.as_dict(),
        "components": {c.name: present.get(c.name, []) for c in COMPONENTS}, "extra": extra,
        "licences": licences, "declared_by": declared[0] if declared else None,
        "osaid": _osaid(present, evaluation.licenses), "weights": weights, "unsafe": unsafe,
    }  # fmt: skip


def _licence(raw: str) -> dict[str, Any]:
    lic = normalize(raw)
    return {"raw": raw, "spdx": lic.spdx, "kind": lic.kind, "open": lic.is_open}


def _declared(root: Path, files: list[tuple[str, Path]]) -> Declared | None:
    """Per-component licences declared by a MOT model file in the folder, if there is one."""
    for rel, path in files:
        if rel.endswith(("mot.yml", "mot.yaml")) or (rel.startswith("models/") and rel.endswith(".yml")):
            try:
                components, _ = from_mot(_parse(path))
            except (ValueError, AttributeError):
                continue
            return rel, components
    return None


Declared = tuple[str, dict[str, dict[str, Any]]]


def _component_licences(
    present: dict[str, list[str]], licences: list[dict[str, Any]], declared: Declared | None
) -> dict[str, dict[str, Any]]:
    """Each present component's licence: as declared by a MOT file, else the model card's for data and
    documents and the code's own (header or licence file) for code, else the folder's licence file."""
    by_source: dict[str, str] = {}
    for entry in licences:
        if entry["spdx"]:
            by_source.setdefault(entry["from"], entry["spdx"])
    card, files, headers = (by_source.get(k) for k in ("model card license:", "licence file", "SPDX header"))
    out = {}
    for name in present:
        if declared and name in declared[1] and "license" in declared[1][name]:
            out[name] = {"license": declared[1][name]["license"]}
            continue
        code = BY_NAME[name].content == "code"
        choice = (headers or files or card) if code else (card or files)
        out[name] = {"license": choice} if choice else {"license": "unlicensed"}
    return out


def _osaid(present: dict[str, list[str]], licences: dict[str, str]) -> dict[str, Any]:
    return osaid_checklist({n: {"license": licences.get(n, "unlicensed")} for n in present})


def audit_mot(path: Path) -> dict[str, Any]:
    """The class of a MOT model YAML file, computed as MOT computes it."""
    try:
        doc = _parse(Path(path))
        components, global_licences = from_mot(doc if isinstance(doc, dict) else {})
        evaluation = evaluate(components, global_licences)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
    return {"mot_file": str(path), "mof": evaluation.as_dict(), "format_problems": validate_mot(doc), "unsafe": []}


def render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    mof = report["mof"]
    progress = sorted(((int(k), v) for k, v in mof["progress"].items()), reverse=True)
    console.print(f"[bold]{mof['label']}[/] (" + ", ".join(f"Class {'I' * k} {v:.0f}%" for k, v in progress) + ")")
    table = Table(title="MOF components")
    for col in ("component", "class", "status", "licence", "evidence"):
        table.add_column(col)
    evidence = report.get("components", {})
    for comp in COMPONENTS:
        paths = evidence.get(comp.name, [])
        table.add_row(comp.name, "I" * comp.mof_class, mof["status"][comp.name], mof["licenses"].get(comp.name, "-"),
                      ", ".join(paths[:3]) + (f" (+{len(paths) - 3})" if len(paths) > 3 else ""))  # fmt: skip
    console.print(table)
    for reason in mof["reasons"]:
        console.print(f"  holds it back: {reason}", highlight=False)
    if "licences" in report:
        for lic in report["licences"]:
            console.print(f"  licence {lic['spdx'] or lic['raw']} ({lic['kind']}) from {lic['from']} {lic['where']}",
                          highlight=False)  # fmt: skip
    if "osaid" in report:
        items = ", ".join(f"{k}: {'yes' if v['met'] else 'no'}" for k, v in report["osaid"]["items"].items())
        console.print(f"OSAID 1.0: {'complete' if report['osaid']['complete'] else 'incomplete'} ({items})")
    for problem in report.get("format_problems", []):
        console.print(f"  not in MOT's model-file format: {problem}", highlight=False)
    for finding in report["unsafe"]:
        console.print(f"[red]unsafe[/] {finding['kind']}: {finding['path']}: {finding['detail']}", highlight=False)
    if not report["unsafe"] and "folder" in report:
        console.print("no unsafe content found")
