"""Where the per-document cleaning runs: in this process, in local worker processes, or on Ray.

Every executor takes chunks of documents in corpus order and gives their cleaned records back in the
same order, with a bounded number of chunks in flight, so the data stage's output is the same
whatever runs it. Each worker builds the recipe's steps once (spaCy, the decontamination index).
The driver reads the sources and writes every file; workers only compute, so a Ray cluster needs no
shared file system (only clearlm installed on its nodes, and the files that steps such as
`decontaminate` read).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter

from clearlm.data.clean import Record, clean_chunk
from clearlm.data.documents import Document
from clearlm.data.steps import build_steps
from clearlm.errors import RecipeError
from clearlm.recipe import DataConfig, StepConfig

Tag = TypeVar("Tag")


class StepWorker:
    """The recipe's steps, built once per worker process or Ray actor."""

    def __init__(self, configs: list[dict[str, Any]], base_dir: str, keep_text: bool) -> None:
        steps = TypeAdapter(list[StepConfig]).validate_python(configs)
        self.steps, self.keep_text = build_steps(steps, Path(base_dir)), keep_text

    def clean(self, docs: list[Document]) -> list[Record]:
        return clean_chunk(docs, self.steps, self.keep_text)


_worker: StepWorker | None = None


def _init_process(configs: list[dict[str, Any]], base_dir: str, keep_text: bool) -> None:
    global _worker
    _worker = StepWorker(configs, base_dir, keep_text)


def _clean_in_process(docs: list[Document]) -> list[Record]:
    assert _worker is not None
    return _worker.clean(docs)


def _ordered(
    items: Iterable[tuple[Tag, list[Document]]],
    submit: Callable[[int, list[Document]], Any],
    get: Callable[[Any], Any],
    window: int,
) -> Iterator[tuple[Tag, list[Record]]]:
    pending: deque[tuple[Tag, Any]] = deque()
    for n, (tag, docs) in enumerate(items):
        pending.append((tag, submit(n, docs)))
        if len(pending) >= window:
            tag, future = pending.popleft()
            yield tag, get(future)
    while pending:
        tag, future = pending.popleft()
        yield tag, get(future)


class Executor:
    """Runs `StepWorker.clean` over chunks; use as a context manager."""

    def __init__(self, cfg: DataConfig, base_dir: Path) -> None:
        self.cfg = cfg
        self.args = ([c.model_dump(mode="json") for c in cfg.steps], str(base_dir), cfg.keep_removed_text)
        self._close: Callable[[], None] = lambda: None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def map(self, items: Iterable[tuple[Tag, list[Document]]]) -> Iterator[tuple[Tag, list[Record]]]:
        if self.cfg.executor == "ray":
            return self._ray(items)
        if self.cfg.workers > 1:
            return self._processes(items)
        worker = StepWorker(*self.args)
        return ((tag, worker.clean(docs)) for tag, docs in items)

    def _processes(self, items: Iterable[tuple[Tag, list[Document]]]) -> Iterator[tuple[Tag, list[Record]]]:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(self.cfg.workers, initializer=_init_process, initargs=self.args)
        self._close = pool.terminate
        submit = lambda n, docs: pool.apply_async(_clean_in_process, (docs,))  # noqa: E731
        return _ordered(items, submit, lambda future: future.get(), 2 * self.cfg.workers)

    def _ray(self, items: Iterable[tuple[Tag, list[Document]]]) -> Iterator[tuple[Tag, list[Record]]]:
        try:
            import ray
        except ImportError:
            raise RecipeError("data.executor = 'ray' needs Ray: pip install 'ray[default]'") from None
        started = not ray.is_initialized()
        if started:
            local = self.cfg.ray_address is None
            ray.init(
                address=self.cfg.ray_address,
                num_cpus=self.cfg.workers if local else None,
                object_store_memory=256 << 20 if local else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        actors = [ray.remote(StepWorker).remote(*self.args) for _ in range(self.cfg.workers)]

        def close() -> None:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()

        self._close = close
        submit = lambda n, docs: actors[n % len(actors)].clean.remote(docs)  # noqa: E731
        return _ordered(items, submit, ray.get, 2 * len(actors))
