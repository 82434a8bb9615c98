"""A flipped byte in a shard, a tokenizer, a trained model, a checkpoint or a release file is caught by its
sha256 when the file is next read (a stage that reads it, a resume, loading a release, `verify`), in one line
naming the file; nothing trains or scores on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clearlm.artifacts import integrity
from clearlm.errors import ArtifactError
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe
from clearlm.release.load import load_release

pytestmark = pytest.mark.slow  # each runs a few stages of the tiny recipe


def _flip(file: Path, at: float = 0.5) -> None:
    """Flip one bit of the byte at this fraction of the file (its size stays the same)."""
    data = bytearray(file.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    file.write_bytes(bytes(data))


def _expect_named(err: pytest.ExceptionInfo[ArtifactError], file: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{file}: its bytes differ from the sha256 in ")


@pytest.mark.parametrize(
    ("stage", "file", "reader"),
    [
        ("data", "validation.jsonl", "tokenizer"),
        ("tokenizer", "tokenizer.json", "shards"),
        ("shards", "train.bin", "train"),
        ("train", "model.safetensors", "eval"),
        ("train", "checkpoints/step-0000004/model.safetensors", "eval"),
    ],
)
def test_a_stage_refuses_a_damaged_input(tmp_path: Path, tiny_recipe: Path, stage: str, file: str, reader: str) -> None:
    art = Pipeline(load_recipe(tiny_recipe), tmp_path / "runs").run(stage)
    _flip(art.path / file)
    with pytest.raises(ArtifactError) as err:
        Pipeline(load_recipe(tiny_recipe), tmp_path / "runs").run(reader)
    _expect_named(err, art.path / file)
    assert str(err.value).endswith(f"delete {art.path} and run again to rebuild it")
    assert not list((tmp_path / "runs" / "artifacts").glob(f"{reader}-*"))


@pytest.mark.parametrize("file", ["model.safetensors", "state.json", "rng.safetensors", "optimizer"])
def test_resume_refuses_a_damaged_checkpoint(tmp_path: Path, tiny_recipe: Path, file: str) -> None:
    pipe = Pipeline(load_recipe(tiny_recipe), tmp_path / "runs")
    assert pipe.run("train", stop_after=4) is None
    (partial,) = (tmp_path / "runs" / "artifacts").glob("train-*.partial")
    ckpt = partial / "checkpoints" / "step-0000004"
    target = ckpt / file
    if target.is_dir():
        target = sorted(target.glob("*.safetensors"))[0]
    _flip(target, at=0.9)
    with pytest.raises(ArtifactError) as err:
        Pipeline(load_recipe(tiny_recipe), tmp_path / "runs").run("train", resume=True)
    _expect_named(err, target)
    assert str(err.value).endswith(f"delete {ckpt} to start from step 0")  # the only checkpoint


@pytest.mark.parametrize("damage", ["missing", "torn"])
def test_resume_refuses_a_checkpoint_without_its_checksums(tmp_path: Path, tiny_recipe: Path, damage: str) -> None:
    """The second checkpoint lost its checksums: not trusted, and the message says a resume would go back to the
    first (which keeps its optimizer state when the run was stopped early)."""
    pipe = Pipeline(load_recipe(tiny_recipe, ["train.keep_optimizer=all", "train.max_steps=12"]), tmp_path / "runs")
    assert pipe.run("train", stop_after=8) is None
    (root,) = (tmp_path / "runs" / "artifacts").glob("train-*.partial/checkpoints")
    sums = root / "step-0000008" / "checksums.json"
    sums.unlink() if damage == "missing" else sums.write_text("{")
    kind = "FileNotFoundError" if damage == "missing" else "JSONDecodeError"
    with pytest.raises(ArtifactError) as err:
        Pipeline(load_recipe(tiny_recipe, ["train.keep_optimizer=all", "train.max_steps=12"]), tmp_path / "runs").run(
            "train", resume=True
        )
    assert str(err.value) == (f"{sums}: unreadable ({kind}), so this checkpoint cannot be trusted; delete "
                              f"{root / 'step-0000008'} to resume from step-0000004")  # fmt: skip


def test_older_checkpoints_list_only_the_files_they_keep(tmp_path: Path, tiny_recipe: Path) -> None:
    """Older checkpoints lose their optimizer state; their checksums must not list the deleted files."""
    art = Pipeline(load_recipe(tiny_recipe), tmp_path / "runs").run("train")
    older = art.path / "checkpoints" / "step-0000004"
    assert not (older / "optimizer").exists()
    assert "optimizer/" not in (older / "checksums.json").read_text()
    assert "optimizer/" in (art.path / "checkpoints" / "step-0000008" / "checksums.json").read_text()


@pytest.mark.parametrize("file", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_damaged_release_is_named_when_loaded_and_by_verify(tmp_path: Path, tiny_run: Pipeline, file: str) -> None:
    release = tmp_path / "release"
    shutil.copytree(tiny_run.artifacts["release"].path, release)
    _flip(release / file, at=0.3)
    with pytest.raises(ArtifactError) as err:
        load_release(release)
    _expect_named(err, release / file)
    assert integrity(release) == [f"{file}: content differs from manifest"]


def test_a_damaged_dataset_in_a_release_does_not_stop_loading_the_model(tmp_path: Path, tiny_run: Pipeline) -> None:
    """Loading a model checks the files it reads; `verify` checks them all."""
    release = tmp_path / "release"
    shutil.copytree(tiny_run.artifacts["release"].path, release)
    (dataset,) = [p for p in release.rglob("*.zst") if "train" in p.name][:1]
    _flip(dataset)
    load_release(release)
    assert integrity(release) == [f"{dataset.relative_to(release).as_posix()}: content differs from manifest"]
