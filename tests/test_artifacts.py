import json

from clearlm.artifacts import ArtifactStore, compute_digest, integrity


def test_digest_depends_on_kind_config_and_inputs(tmp_path):
    store = ArtifactStore(tmp_path)
    a = compute_digest("data", {"x": 1}, {})
    assert a == compute_digest("data", {"x": 1}, {})
    assert a != compute_digest("data", {"x": 2}, {})
    assert a != compute_digest("tokenizer", {"x": 1}, {})
    store.start("data", a)
    art = store.finish("data", a, {"x": 1}, {}, {}, 0.0)
    assert compute_digest("t", {}, {"data": art.digest}) != compute_digest("t", {}, {})


def test_finish_writes_manifest_with_hashes_and_renames(tmp_path):
    store = ArtifactStore(tmp_path)
    digest = compute_digest("data", {}, {})
    work = store.start("data", digest)
    (work / "a.txt").write_text("hello")
    assert store.lookup("data", digest) is None, "a partial artifact must never look complete"
    art = store.finish("data", digest, {}, {}, {"n": 1}, 1.5)
    assert not work.exists() and art.path.is_dir()
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["outputs"]["a.txt"].startswith("sha256:2cf24dba")
    assert manifest["metrics"] == {"n": 1} and manifest["environment"]["torch"]
    assert store.lookup("data", digest).digest == digest
    assert integrity(art.path) == []
    (art.path / "a.txt").write_text("tampered")
    assert integrity(art.path) == ["a.txt: content differs from manifest"]
    (art.path / "a.txt").unlink()
    assert store.lookup("data", digest) is None


def test_start_discards_stale_partial_unless_kept(tmp_path):
    store = ArtifactStore(tmp_path)
    work = store.start("train", "sha256:00")
    (work / "old").write_text("x")
    assert (store.start("train", "sha256:00", keep_partial=True) / "old").exists()
    assert not (store.start("train", "sha256:00") / "old").exists()
