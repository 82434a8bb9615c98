"""`clearlm audit` on hostile and ordinary folders: findings reported, nothing executed."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from clearlm.cli import app
from clearlm.openness.audit import audit_folder

runner = CliRunner()


class _Payload:
    """Pickles to a call of os.system; the test only ever writes it, never loads it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _hostile_folder(root: Path) -> Path:
    root.mkdir()
    sentinel = root.parent / "SENTINEL"
    (root / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Payload(sentinel)}))
    torch.save({"w": torch.zeros(2)}, root / "safe.pt")
    (root / "leak").symlink_to("/etc/passwd")
    with zipfile.ZipFile(root / "extras.zip", "w") as z:
        z.writestr("../../outside.txt", "x")
        z.writestr("fine.txt", "y")
    (root / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
    (root / "modeling_evil.py").write_text("import os\nos.system('touch SENTINEL')\n")
    (root / "README.md").write_text("---\nlicense: llama3.1\n---\n# a model\n")
    return sentinel


def test_hostile_files_are_flagged_and_nothing_runs(tmp_path):
    sentinel = _hostile_folder(tmp_path / "m")
    report = audit_folder(tmp_path / "m")
    kinds = {(f["kind"], f["path"]) for f in report["unsafe"]}
    assert ("dangerous-pickle", "pytorch_model.bin") in kinds
    assert ("symlink-escape", "leak") in kinds
    assert ("archive-path-escape", "extras.zip") in kinds
    assert ("remote-code", "modeling_evil.py") in kinds
    assert not any(f["path"] == "safe.pt" and f["kind"] == "dangerous-pickle" for f in report["unsafe"])
    assert any("posix.system" in f["detail"] or "os.system" in f["detail"] for f in report["unsafe"])
    assert not sentinel.exists(), "the pickle was never loaded"
    llama = [lic for lic in report["licences"] if lic["from"] == "model card license:"]
    assert llama and llama[0]["kind"] == "restrictive" and not llama[0]["open"]
    assert report["mof"]["class"] == 0
    result = runner.invoke(app, ["audit", str(tmp_path / "m"), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 1 and "dangerous-pickle" in result.output
    assert json.loads((tmp_path / "a.json").read_text())["unsafe"]
    assert not sentinel.exists()


def test_an_open_hugging_face_style_folder(tmp_path):
    root = tmp_path / "hf"
    root.mkdir()
    (root / "LICENSE").write_text(
        "                                 Apache License\n                           Version 2.0, January 2004\n"
    )
    (root / "README.md").write_text("---\nlicense: apache-2.0\nmodel-index: []\n---\n# m\n")
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (root / "tokenizer.json").write_text("{}")
    report = audit_folder(root)
    assert report["unsafe"] == []
    assert report["components"]["Model parameters (Final)"] == ["model.safetensors"]
    assert report["mof"]["status"]["Model card"] == "included"
    assert report["mof"]["class"] == 0 and any("Model architecture is missing" in r for r in report["mof"]["reasons"])
    assert report["weights"][0]["sha256"].startswith("sha256:") and report["extra"]["tokenizer"] == ["tokenizer.json"]


def test_audit_mot_file_gives_mot_class(tmp_path):
    names = ["Model architecture", "Model parameters (Final)", "Model card", "Data card", "Technical report",
             "Evaluation results"]  # fmt: skip
    doc = {"framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
           "release": {"name": "m", "license": {"distribution": {"name": "Apache-2.0", "path": ""}},
                       "components": [{"name": n, "description": ""} for n in names]}}  # fmt: skip
    (tmp_path / "m.yml").write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["audit", "--mot", str(tmp_path / "m.yml")])
    assert result.exit_code == 0 and "Class III - Open Model" in result.output
    (tmp_path / "bad.yml").write_text("release: {components: 5}")
    bad = runner.invoke(app, ["audit", "--mot", str(tmp_path / "bad.yml")])
    assert bad.exit_code == 2 and "bad.yml: release.components must be a list" in bad.output


def test_declared_paths_outside_the_folder_and_special_files_do_not_count(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    names = ["Model architecture", "Model parameters (Final)", "Model card", "Data card", "Technical report",
             "Evaluation results"]  # fmt: skip
    doc = {"framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
           "release": {"name": "m", "license": {"distribution": {"name": "Apache-2.0", "path": ""}},
                       "components": [{"name": n, "component_path": "/usr/lib"} for n in names]}}  # fmt: skip
    (root / "mot.yml").write_text(yaml.safe_dump(doc))
    os.mkfifo(root / "LICENSE")  # reading it would block forever
    report = audit_folder(root)
    assert report["mof"]["class"] == 0 and all(v == [] for v in report["components"].values())
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"release": {"license": "MIT", "components": []}}))
    bad = runner.invoke(app, ["audit", "--mot", str(tmp_path / "bad.yml")])
    assert bad.exit_code == 2 and "release.license must be a mapping" in bad.output
