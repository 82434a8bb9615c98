"""Checkpoints: safetensors weights, optimizer state and RNG, plus a JSON trainer state.

Everything is stored without pickle, so a release's checkpoints are safe to open anywhere. A
checkpoint directory is written under a temporary name and renamed, so a crash never leaves a
half-written checkpoint that resume would pick up.

The weights are gathered whole (`torch.distributed.checkpoint.state_dict`, full tensors keyed by
parameter name) and written by rank 0, since the release, evaluation and `verify` read them as one file.
The optimizer state, two or three times larger, is written by `torch.distributed.checkpoint` itself:
each rank writes its own shards in parallel, as safetensors files whose metadata records each shard's
offsets (its Hugging Face storage writer, so no pickled `.metadata` file), and loading reshards them to
whatever the resuming run holds. A run saved with any number of processes, DDP or FSDP2, resumes with
any other (the data position is global, too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clearlm.artifacts import require_intact, sha256_file, write_json_atomic
from clearlm.errors import ArtifactError, DiskFullError
from clearlm.model.weights import WEIGHTS, save_state, tied
from clearlm.storage import require_space
from clearlm.train.checkpoint_files import CHECKSUMS, OPTIMIZER, RNG, STATE, checkpoint_dir, checkpoints
from clearlm.world import SINGLE, World, barrier


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Without a process group DCP saves and loads in this one process, as meant, but warns each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _sort_metadata(file: Path) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` entries sorted. safetensors writes them in
    hash order, which changes from run to run; sorted, identical runs give byte-identical shards (as `verify`
    checks). The same entries in compact JSON take the same bytes, so the tensor data is not touched."""
    with file.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:
            raise ValueError(f"{file}: the sorted safetensors header does not fit in place")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces


def _optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's optimizer state by parameter name (DTensor shards under FSDP2; a number becomes a 0-d tensor,
    since DCP would write it as raw bytes that break the safetensors file), and the param groups. An optimizer
    that has not stepped yet gets zero-filled state of the right shapes to load into."""
    optim = get_optimizer_state_dict(model, opt)
    optim["state"] = {name: {key: value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
                             for key, value in entry.items()} for name, entry in optim["state"].items()}  # fmt: skip
    return optim


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_optimizer: bool,
    w: World = SINGLE,
) -> Path:
    """Write checkpoint `step` (every rank must call this: each writes its optimizer shards, rank 0 the rest)."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    optim = _optimizer_state(model, opt)
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if w.main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(w)
    _require_space(root, _nbytes(optim["state"]) + (_nbytes(weights) if w.main else 0), step, w)
    with _one_process_is_meant():
        dcp.save(optim["state"], storage_writer=HuggingFaceStorageWriter(str(tmp / OPTIMIZER), save_distributed=True))
    if not w.main:
        return final
    for shard in (tmp / OPTIMIZER).glob("*.safetensors"):  # every rank's writes are done when save returns
        _sort_metadata(shard)
    save_state(weights, tmp / WEIGHTS, tied(model))
    rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    save_file(rng, str(tmp / RNG))
    # which parameters had optimizer state: one that never had a gradient has none, and must get none on resume
    held = sorted(optim["state"])
    trainer = {**state, "step": step, "param_groups": optim["param_groups"], "optimizer_state_of": held}
    (tmp / STATE).write_text(json.dumps(trainer, indent=2, sort_keys=True) + "\n")  # the same bytes after a resume
    _write_checksums(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if not keep_optimizer:
        for older in root.glob("step-*"):
            if older != final and (older / OPTIMIZER).exists():
                _drop_optimizer(older)
    return final


def _require_space(root: Path, needed: int, step: int, w: World) -> None:
    """Fail before writing when the checkpoint cannot fit: rank 0 decides for the bytes all ranks will write (to
    the one file system they share) and tells the others, so that every rank stops, or none."""
    sizes = [needed] * w.size
    if w.distributed:
        dist.all_gather_object(sizes, needed)
    problem: list[str | None] = [None]
    if w.main:
        try:
            require_space(root, sum(sizes), f"checkpoint step {step}")
        except DiskFullError as e:
            problem = [str(e)]
    if w.distributed:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise DiskFullError(problem[0])


def _nbytes(tree: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, as this rank writes them."""
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0


def _write_checksums(folder: Path) -> None:
    """Record every file's sha256: resume checks them, so a flipped bit is an error, not a silently other run."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    write_json_atomic(folder / CHECKSUMS, {p.relative_to(folder).as_posix(): sha256_file(p) for p in files})


def _drop_optimizer(folder: Path) -> None:
    """Delete an older checkpoint's optimizer state: renamed away first (a half-deleted folder must not look
    resumable; a resumed stage deletes stray `.tmp` names), then left out of the checksums, then deleted."""
    doomed = folder / (OPTIMIZER + ".tmp")
    os.replace(folder / OPTIMIZER, doomed)
    digests = json.loads((folder / CHECKSUMS).read_text())
    write_json_atomic(folder / CHECKSUMS, {k: v for k, v in digests.items() if not k.startswith(OPTIMIZER + "/")})
    shutil.rmtree(doomed)


def _require_intact(path: Path) -> None:
    """Every file of the checkpoint as its checksums list it; the error says where a resume would start instead."""
    others = [p for p in checkpoints(path.parent) if p != path and (p / OPTIMIZER).exists()]
    remedy = f"delete {path} to resume from {others[-1].name}" if others else f"delete {path} to start from step 0"
    try:
        digests = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path / CHECKSUMS}: unreadable ({type(e).__name__}), so this checkpoint cannot be "
                            f"trusted; {remedy}") from None  # fmt: skip
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ArtifactError(f"{path / CHECKSUMS}: not a map of file names to sha256s; {remedy}")
    require_intact(path, digests, CHECKSUMS, remedy)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer state and RNG (every rank reads what it holds) and return the trainer state.
    Every file is first checked against the checkpoint's checksums."""
    _require_intact(path)
    state = json.loads((path / STATE).read_text())
    weights = load_file(str(path / WEIGHTS))
    if tied(model):
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    optim = _optimizer_state(model, opt)
    held = set(state["optimizer_state_of"])
    if unknown := held - optim["state"].keys():
        raise ArtifactError(f"{path / STATE}: optimizer state of a parameter this model lacks: {min(unknown)}")
    optim["state"] = {name: entry for name, entry in optim["state"].items() if name in held}
    reader = HuggingFaceStorageReader(str(path / OPTIMIZER))
    saved = reader.read_metadata().state_dict_metadata  # each tensor keyed `name.key`, as DCP flattens nested state
    if missing := sorted(f"{name}.{key}" for name, entry in optim["state"].items() for key in entry
                         if f"{name}.{key}" not in saved):  # fmt: skip
        raise ArtifactError(f"{path / OPTIMIZER}: {len(missing)} optimizer tensors are missing (first: {missing[0]})")
    with _one_process_is_meant():
        dcp.load(optim["state"], storage_reader=reader)
    loaded = {"state": optim["state"], "param_groups": state["param_groups"]}
    set_optimizer_state_dict(model, opt, loaded, options=StateDictOptions(strict=False))  # keeps it left out
    rng = load_file(str(path / RNG))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
