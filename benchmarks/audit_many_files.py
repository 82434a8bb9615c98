"""`clearlm audit` on a folder of many tiny files (issue 20: bounded time and memory on hostile folders).

Writes `--files` one-line files (1,000 to a folder, under `data/datasets/`, so every one is evidence for a component
and listed in the report) and times `clearlm audit FOLDER --json REPORT` in a fresh process: wall time, peak RSS, the
report's size. The folder is made once and kept under `--workdir` for a rerun.

    python benchmarks/audit_many_files.py --files 1000000 --workdir /tmp/audit-many
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make(folder: Path, files: int) -> None:
    """The folder of `files` one-line files, kept for a rerun with the same count (made afresh otherwise)."""
    done = folder / ".complete"
    if done.is_file() and int(done.read_text()) == files:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for start in range(0, files, 1000):
        part = folder / "data" / "datasets" / f"part-{start // 1000:05d}"
        part.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(files, start + 1000)):
            (part / f"{i}.jsonl").write_bytes(b"{}\n")
    done.write_text(str(files))


def main() -> None:
    """Make the folder, audit it in a fresh process, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/audit-many"))
    args = parser.parse_args()
    folder = args.workdir / "folder"
    started = time.perf_counter()
    make(folder, args.files)
    print(f"folder of {args.files:,} files ready in {time.perf_counter() - started:.1f} s")
    report = args.workdir / "report.json"
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "clearlm", "audit", str(folder), "--json", str(report)],
                         capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if not report.is_file():
        sys.exit(f"audit failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    data = json.loads(report.read_text())
    print(f"audit: exit {run.returncode}, {wall:.1f} s wall, {args.files / wall:,.0f} files/s, "
          f"peak RSS {peak:,.0f} MB, report {report.stat().st_size / 1e6:.1f} MB, files counted {data['files']:,}, "
          f"datasets listed {len(data['components']['Datasets']):,}")  # fmt: skip


if __name__ == "__main__":
    main()
