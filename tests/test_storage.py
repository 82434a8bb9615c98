"""Disk-full recognition and messages without a size-limited mount (injected errors), and the per-process cache
of files found intact, which must notice any rewrite."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from clearlm import storage
from clearlm.artifacts import intact, sha256_file
from clearlm.errors import DiskFullError
from clearlm.pipeline import Pipeline
from clearlm.recipe import load_recipe


@pytest.mark.parametrize(
    "err",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
        DiskFullError("checkpoint step 4 needs 3.0 MiB but 1.0 MiB is free there"),
    ],
)
def test_a_full_disk_is_recognised_however_it_surfaces(err: Exception) -> None:
    try:
        try:
            raise err
        except Exception as inner:
            raise ValueError("a library wrapped it") from inner
    except ValueError as outer:
        assert storage.disk_full(outer) is err


def test_other_errors_are_not_a_full_disk() -> None:
    assert storage.disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert storage.disk_full(ValueError("no space here")) is None


def test_a_failed_copy_names_its_destination_not_its_source(tmp_path: Path) -> None:
    err = OSError(errno.ENOSPC, "No space left on device", "artifacts/train-1/model.safetensors", None,
                  "artifacts/release-2.partial/model.safetensors")  # fmt: skip
    assert storage.failed_path(err, tmp_path) == Path("artifacts/release-2.partial/model.safetensors")
    assert storage.failed_path(OSError(errno.ENOSPC, "full"), tmp_path) == tmp_path


def test_require_space_names_the_path_and_the_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 30, 9 << 30, 512 << 10))
    with pytest.raises(DiskFullError, match=rf"^{tmp_path}: checkpoint step 4 needs 4.0 MiB but 512.0 KiB is free"):
        storage.require_space(tmp_path, 3 << 20, "checkpoint step 4")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 30, 6 << 30, 4 << 30))
    storage.require_space(tmp_path, 3 << 20, "checkpoint step 4")
    assert storage.human(3 << 30) == "3.0 GiB" and storage.human(12) == "12 B"


def test_a_stage_that_fills_the_disk_is_one_line_and_leaves_nothing_half_written(
    tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = Pipeline(load_recipe(tiny_recipe), tmp_path / "runs")
    pipe.run("tokenizer")

    def full(tok, eos_id, data_dir, out):
        (out / "train.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.bin"))

    monkeypatch.setattr("clearlm.data.shards.write_shards", full)
    with pytest.raises(DiskFullError) as err:
        pipe.run("shards")
    message = str(err.value)
    assert message.startswith(str(tmp_path / "runs" / "artifacts")) and "shards-" in message and "\n" not in message
    assert "no space left on the device" in message and "while building shards, after writing 4 B" in message
    assert message.endswith("once space is freed, run again")
    assert not list((tmp_path / "runs" / "artifacts").glob("shards-*"))  # the partial output is gone


def test_the_intact_cache_notices_a_rewrite_that_restores_size_and_mtime(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 100)
    digest = sha256_file(file)
    assert intact(file, digest)
    stat = file.stat()
    file.write_bytes(b"b" * 100)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` of a bad copy would leave it
    assert not intact(file, digest)
