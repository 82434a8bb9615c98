"""`clearlm audit` on hostile folders stays bounded and says what it could not check: a tar decompression bomb,
configs too large or too deep to parse, YAML alias bombs, deep nesting everywhere, many tiny files."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from clearlm.errors import InputError
from clearlm.openness import audit
from clearlm.openness.audit import audit_folder, audit_mot

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)  # nine levels of nine aliases: 387 million leaves once expanded


def _kinds(report: dict) -> dict[str, str]:
    return {f["path"]: f["kind"] for f in report["unsafe"]}


def test_a_tar_bomb_is_listed_only_up_to_a_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_LISTED", 1 << 20)
    with tarfile.open(tmp_path / "weights.tar.gz", "w:gz") as tar:
        for i in range(3):  # members after 1 MiB of zeros are not reached
            info = tarfile.TarInfo(f"zeros-{i}")
            info.size = 2 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    report = audit_folder(tmp_path)
    assert _kinds(report) == {"weights.tar.gz": "unlisted-archive"}
    assert "listing stopped after 1 members" in report["unsafe"][0]["detail"]


def test_a_zip_bomb_is_listed_without_being_extracted(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "data.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros", bytes(64 << 20))  # 64 MiB in ~64 KiB
        z.writestr("../escape.py", "print('out')")
    assert _kinds(audit_folder(tmp_path)) == {"data.zip": "archive-path-escape"}


@pytest.mark.parametrize(
    "config",
    ["[" * 200_000 + "]" * 200_000, '{"auto_map": ' + "[" * 100_000 + "]" * 100_000 + "}"],
)
def test_a_config_too_deep_to_parse_is_reported_not_a_crash(tmp_path: Path, config: str) -> None:
    (tmp_path / "config.json").write_text(config)
    report = audit_folder(tmp_path)
    assert _kinds(report) == {"config.json": "unscannable-config"}
    assert "nested too deeply" in report["unsafe"][0]["detail"]


def test_a_config_too_large_to_parse_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_PARSED", 1 << 10)
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Model"}, "pad": "x" * 2000}))
    assert _kinds(audit_folder(tmp_path)) == {"config.json": "unscannable-config"}


def test_yaml_alias_bombs_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(f"---\n{LAUGHS}license: mit\n---\n# card\n")
    (tmp_path / "mot.yml").write_text(LAUGHS)
    report = audit_folder(tmp_path)
    json.dumps(report)  # the report can be written out
    assert report["declared_by"] is None and not any(entry["from"] == "model card license:"
                                                      for entry in report["licences"])  # fmt: skip
    with pytest.raises(InputError, match=r"mot.yml: invalid YAML \(aliases \(\*name\) are not accepted\)"):
        audit_mot(tmp_path / "mot.yml")
    (tmp_path / "deep.yml").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match=r"deep\.yml: nested too deeply to parse"):
        audit_mot(tmp_path / "deep.yml")


def test_many_tiny_files_are_all_counted(tmp_path: Path) -> None:
    for d in range(20):
        folder = tmp_path / "data" / "datasets" / f"part-{d}"
        folder.mkdir(parents=True)
        for i in range(1000):
            (folder / f"{i}.jsonl").write_bytes(b"{}\n")
    report = audit_folder(tmp_path)
    assert report["files"] == 20_000 and len(report["components"]["Datasets"]) == 20_000
