"""The sandbox against hostile programs: each is contained and reported as a failed sample with its reason.

Where a test goes around the audit hook (ctypes, a second Python, a shell tool), only an OS-level layer can stop the
program, so the test runs only where `enforcement()` says that layer holds, and is skipped with its words otherwise.
The checks for leftover processes look for a marker in the command lines under /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clearlm import sandbox
from clearlm.sandbox import TAIL_BYTES, Limits, Verdict, enforcement, run_many, run_python

FAST = Limits(wall_seconds=3, cpu_seconds=3, memory_bytes=512 << 20, output_bytes=64 << 10, processes=8)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _require(protection: str) -> None:
    state = enforcement()[protection]
    if not state.startswith("enforced"):
        pytest.skip(f"{protection}: {state}")


def _marked(marker: str) -> list[int]:
    """The processes whose command line holds `marker`."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and marker.encode() in Path(entry.path, "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return found


def _alive(pid: int) -> int | None:
    """The parent of `pid`, or None once it has exited (a zombie only waits to be reaped)."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:2]
    except OSError:
        return None
    return None if state in ("Z", "X") else int(parent)


def _run_watched(code: str, limits: Limits, marker: str) -> tuple[Verdict, int]:
    """Run `code` while counting its processes that carry `marker`: the verdict and the most seen at once."""
    most = 0
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_python, code, limits)
        while not future.done():
            most = max(most, len(_marked(marker)))
            time.sleep(0.02)
    return future.result(), most


def _python(marker: str, code: str) -> str:
    """A program that becomes a Python running `code` with `marker` in its command line."""
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {code!r}, {marker!r}])"


@pytest.fixture
def marker() -> str:
    return f"clearlm-sandbox-test-{uuid.uuid4().hex}"


@pytest.fixture
def exposed() -> Iterator[Path]:
    """A folder outside the sandbox that anyone may read and write, so that only the sandbox keeps a program out."""
    folder = Path(tempfile.mkdtemp(prefix="clearlm-sandbox-outside-"))
    folder.chmod(0o777)
    secret = folder / "secret.txt"
    secret.write_text("the-secret-is-42\n")
    secret.chmod(0o644)
    yield folder
    shutil.rmtree(folder)


def test_enforcement_says_what_holds():
    report = enforcement()
    assert {"network", "filesystem", "processes", "leftover processes", "orphans", "resources"} <= set(report)
    assert all(value.startswith(("enforced", "not enforced")) for value in report.values())


def test_a_correct_program_passes_and_its_folder_is_removed():
    verdict = run_python("import os\ndef add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint(os.getcwd())", FAST)
    assert (verdict.passed, verdict.reason, verdict.returncode, verdict.stderr) == (True, "passed", 0, "")
    assert not os.path.exists(verdict.stdout.strip())


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("def add(a, b):\n    return a - b\nassert add(2, 3) == 5", "failed: AssertionError"),
        ("print(undefined_name)", "failed: NameError"),
        ("import sys\nsys.exit(3)", "failed: exit 3"),
    ],
)
def test_a_wrong_program_fails_with_its_exception(code: str, reason: str):
    verdict = run_python(code, FAST)
    assert (verdict.passed, verdict.reason) == (False, reason)


@pytest.mark.parametrize(
    "exit",
    [
        "import os\nos._exit(0)",
        "import sys\nsys.exit(0)",
        "raise SystemExit",
        "try:\n    raise SystemExit(0)\nfinally:\n    pass",
        "import atexit, os\natexit.register(os._exit, 0)",  # the assert fails, then the handler exits 0
        "import os, signal\nsignal.signal(signal.SIGTERM, lambda *_: os._exit(0))\nos.kill(os.getpid(), 15)",
        "import threading, time, os\nthreading.Thread(target=os._exit, args=(0,)).start()\ntime.sleep(2)",
        "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])",
        "import os, time\nif os.fork():\n    os._exit(0)\ntime.sleep(0.2)",  # only its fork would reach the end
    ],
)
def test_exiting_with_status_0_before_the_end_fails(exit: str):
    verdict = run_python(f"{exit}\ndef add(a, b):\n    return a - b\nassert add(2, 3) == 5", FAST)
    assert (verdict.passed, verdict.reason, verdict.returncode) == (False, "failed: exited before the end", 0)


def test_a_program_that_prints_a_lot_passes():
    verdict = run_python("for i in range(5000):\n    print(i, 'x' * 100)\nassert True", Limits(output_bytes=1 << 20))
    assert (verdict.passed, verdict.reason) == (True, "passed")
    assert verdict.stdout.endswith(f"4999 {'x' * 100}\n")


def test_a_program_that_reaches_its_end_passes_whatever_its_daemon_threads_do():
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\nassert True"
    verdict = run_python(code, FAST)
    assert (verdict.passed, verdict.reason) == (True, "passed")
    assert verdict.seconds < 2


def test_a_program_that_forks_passes_if_its_own_process_reaches_the_end():
    code = "import os\nchild = os.fork()\nif child:\n    os.waitpid(child, 0)\nelse:\n    os._exit(0)"
    verdict = run_python(code, FAST)
    assert (verdict.passed, verdict.reason) == (True, "passed")


def test_a_sandbox_short_of_a_reported_layer_does_not_run_the_program(monkeypatch: pytest.MonkeyPatch):
    layers = sandbox._probe()
    monkeypatch.setattr(sandbox, "_probe", lambda: {**layers, "landlock": 99})
    verdict = run_python("print('ran')", FAST)
    assert (verdict.passed, verdict.reason, verdict.stdout) == (False, "sandbox error", "")
    assert "could not apply landlock" in verdict.stderr


@linux_only
def test_an_infinite_loop_is_stopped_at_the_wall_time_with_all_its_processes(marker: str):
    limits = Limits(wall_seconds=2, cpu_seconds=30)
    verdict, most = _run_watched(_python(marker, "while True: pass"), limits, marker)
    assert (verdict.passed, verdict.reason, verdict.returncode) == (False, "timeout", None)
    assert most == 1 and 2 <= verdict.seconds < 3.5
    assert _marked(marker) == []


def test_a_busy_loop_is_stopped_at_the_cpu_time_limit():
    verdict = run_python("while True: pass", Limits(wall_seconds=10, cpu_seconds=1))
    assert (verdict.passed, verdict.reason) == (False, "cpu time limit")
    assert verdict.seconds < 4


@linux_only
def test_a_fork_bomb_is_held_to_the_process_limit_and_killed(marker: str):
    _require("processes")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    verdict, most = _run_watched(_python(marker, bomb), Limits(wall_seconds=2, processes=8), marker)
    assert (verdict.passed, verdict.reason) == (False, "timeout")
    assert 2 <= most <= 8
    assert time.monotonic() - started < 4
    assert _marked(marker) == []


@pytest.mark.parametrize("code", ["hog = bytearray(8 << 30)", "hog = []\nwhile True:\n    hog.append(bytes(16 << 20))"])
def test_a_memory_hog_hits_the_memory_limit(code: str):
    verdict = run_python(code, FAST)
    assert (verdict.passed, verdict.reason) == (False, "memory limit")


def test_a_huge_output_is_cut_off_and_only_its_tail_kept():
    verdict = run_python("while True:\n    print('x' * 1000)", Limits(wall_seconds=10, output_bytes=1 << 20))
    assert (verdict.passed, verdict.reason, verdict.returncode) == (False, "output limit", None)
    assert verdict.seconds < 3
    assert 0 < len(verdict.stdout) <= TAIL_BYTES


def test_a_huge_file_hits_the_file_size_limit():
    verdict = run_python("open('big', 'wb').write(b'x' * (4 << 20))", Limits(file_bytes=1 << 20))
    assert (verdict.passed, verdict.reason) == (False, "file size limit")


def test_writing_outside_its_folder_is_blocked(exposed: Path):
    target = exposed / "written.txt"
    verdict = run_python(f"open({str(target)!r}, 'w').write('escaped')", FAST)
    assert (verdict.passed, verdict.reason) == (False, "blocked: filesystem")
    assert not target.exists()


def test_writing_outside_around_the_audit_hook_fails(exposed: Path):
    _require("filesystem")
    targets = [exposed / name for name in ("by-ctypes", "by-python", "by-shell")]
    code = f"""
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
print("open:", libc.open({str(targets[0]).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644), ctypes.get_errno())
subprocess.run([sys.executable, "-c", "open({str(targets[1])!r}, 'w').write('escaped')"])
try:
    subprocess.run(["touch", {str(targets[2])!r}])
except OSError as error:
    print("touch:", error)
"""
    verdict = run_python(code, FAST)
    assert verdict.passed, verdict.stderr  # the attempts ran, and each failed
    assert "open: -1 13" in verdict.stdout and "PermissionError" in verdict.stderr
    assert not any(target.exists() for target in targets)


def test_reading_outside_its_folder_is_blocked(exposed: Path):
    verdict = run_python(f"print(open({str(exposed / 'secret.txt')!r}).read())", FAST)
    assert (verdict.passed, verdict.reason) == (False, "blocked: filesystem")
    assert "the-secret" not in verdict.stdout + verdict.stderr
    listing = run_python(f"import os\nprint(os.listdir({str(exposed)!r}))", FAST)
    assert (listing.reason, "secret.txt" in listing.stdout) == ("blocked: filesystem", False)


def test_reading_outside_around_the_audit_hook_fails(exposed: Path):
    _require("filesystem")
    secret = str(exposed / "secret.txt")
    code = f"""
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open({secret.encode()!r}, os.O_RDONLY)
buffer = ctypes.create_string_buffer(64)
print("open:", fd, ctypes.get_errno(), fd >= 0 and libc.read(fd, buffer, 64), buffer.value)
subprocess.run([sys.executable, "-c", "print(open({secret!r}).read())"])
for command in (["cat", {secret!r}], ["/bin/sh", "-c", "cat {secret}"]):
    try:
        subprocess.run(command)
    except OSError as error:
        print(command[0], error)
"""
    verdict = run_python(code, FAST)
    assert "open: -1 13" in verdict.stdout and "PermissionError" in verdict.stderr  # the attempts ran, and failed
    assert "the-secret" not in verdict.stdout + verdict.stderr


def test_opening_a_socket_is_blocked_and_nothing_connects():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')"
        verdict = run_python(code, FAST)
        assert (verdict.passed, verdict.reason) == (False, "blocked: network")
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


def test_a_socket_around_the_audit_hook_connects_nowhere():
    _require("network")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"""
import ctypes, socket, struct, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
address = struct.pack("=H", socket.AF_INET) + struct.pack("!H", {port}) + socket.inet_aton("127.0.0.1") + bytes(8)
print("socket:", fd, ctypes.get_errno(), fd >= 0 and libc.connect(fd, address, len(address)))
subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"])
"""
        verdict = run_python(code, FAST)
        assert "socket: -1 13" in verdict.stdout, verdict.stderr
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


@linux_only
def test_a_daemon_left_behind_is_killed(marker: str):
    _require("leftover processes")
    daemon = _python(marker, "import time; time.sleep(60)").replace("\n", "\n        ")
    code = f"""
import os, time
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(write_end, b"up")
        {daemon}
    os._exit(0)
assert os.read(read_end, 2) == b"up"
time.sleep(0.5)
"""
    verdict, most = _run_watched(code, FAST, marker)
    assert verdict.passed and most == 1
    assert _marked(marker) == []


def test_the_evaluators_environment_and_process_are_out_of_reach(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CLEARLM_SANDBOX_SECRET", "hunter2")
    code = f"""
import os
print(sorted(os.environ.items()))
try:
    os.kill({os.getpid()}, 0)
    print("can signal the evaluator")
except OSError as error:
    print(type(error).__name__)
"""
    verdict = run_python(code, FAST)
    assert verdict.passed and "hunter2" not in verdict.stdout
    assert "can signal" not in verdict.stdout


def test_run_many_runs_in_parallel_and_keeps_the_input_order():
    programs = [f"import time\ntime.sleep({0.6 - 0.1 * i})\nprint({i})" for i in range(4)]
    started = time.monotonic()
    verdicts = run_many(programs, FAST, workers=4)
    assert [verdict.stdout for verdict in verdicts] == [f"{i}\n" for i in range(4)]
    assert time.monotonic() - started < 2


@linux_only
def test_hostile_programs_run_together_are_each_contained(marker: str, exposed: Path):
    """Under load: every hostile kind twice, beside correct programs, 6 at a time on this machine's cores. Each gets
    its own verdict and reason, the correct ones pass, nothing is written or read outside, nothing connects, and no
    process is left."""
    _require("processes")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        hostile = {
            "loop": (_python(marker, "while True: pass"), {"timeout", "cpu time limit"}),
            "fork bomb": (_python(marker, bomb), {"timeout", "cpu time limit"}),
            "memory": ("hog = []\nwhile True:\n    hog.append(bytes(16 << 20))", {"memory limit"}),
            "write": (f"open({str(exposed / 'written.txt')!r}, 'w').write('escaped')", {"blocked: filesystem"}),
            "read": (f"print(open({str(exposed / 'secret.txt')!r}).read())", {"blocked: filesystem"}),
            "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')",
                       {"blocked: network"}),
            "output": ("while True:\n    print('x' * 1000)", {"output limit"}),
            "correct": ("print(sum(range(10)))", {"passed"}),
        }  # fmt: skip
        kinds = [k for k in hostile for _ in range(2)]
        verdicts = run_many([hostile[k][0] for k in kinds], FAST, workers=6)
        for kind, verdict in zip(kinds, verdicts, strict=True):
            got = "passed" if verdict.passed else verdict.reason
            assert got in hostile[kind][1], (kind, got, verdict.stderr[-300:])
        assert [v.stdout for k, v in zip(kinds, verdicts, strict=True) if k == "correct"] == ["45\n", "45\n"]
        assert not (exposed / "written.txt").exists()
        assert all("the-secret" not in v.stdout + v.stderr for v in verdicts)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    assert _marked(marker) == []


# An evaluator in a process of its own, to be killed: it reads its programs as JSON on stdin, so that its command line
# does not carry their marker.
EVALUATOR = """
import json, sys
from clearlm.sandbox import Limits, run_many, run_python
programs, limits = json.load(sys.stdin), Limits(wall_seconds=600, cpu_seconds=600)
run_python(programs[0], limits) if len(programs) == 1 else run_many(programs, limits, workers=len(programs))
"""


@linux_only
@pytest.mark.parametrize("count", [1, 2], ids=["run_python", "run_many"])
def test_killing_the_evaluator_with_sigkill_kills_its_sandboxes(marker: str, count: int):
    """Nothing outlives an evaluator killed with SIGKILL: not the supervisors, not the programs, which only sleep (so no
    CPU limit would stop them), nor the daemons they started in a session of their own."""
    _require("orphans")
    sleep = _python(marker, "import time; time.sleep(1000)").replace("\n", "; ")
    program = f"import os\nif os.fork() == 0:\n    os.setsid()\n    {sleep}\n{sleep}"
    folders = set(Path(tempfile.gettempdir()).glob("clearlm-sandbox-*"))
    evaluator = subprocess.Popen([sys.executable, "-c", EVALUATOR], stdin=subprocess.PIPE, text=True)
    sandboxes: set[int] = set()
    try:
        assert evaluator.stdin is not None
        evaluator.stdin.write(json.dumps([program] * count))
        evaluator.stdin.close()
        deadline = time.monotonic() + 10
        while len(programs := _marked(marker)) < 2 * count:  # each program and its daemon, with the marker
            assert evaluator.poll() is None and time.monotonic() < deadline, "the programs did not start"
            time.sleep(0.02)
        for pid in programs:  # and up to the evaluator: each sandbox's supervisor and its PID namespace's init
            while pid != evaluator.pid and (parent := _alive(pid)) is not None and pid not in sandboxes:
                sandboxes.add(pid)
                pid = parent
        assert len(sandboxes) == 4 * count, sandboxes
        os.kill(evaluator.pid, signal.SIGKILL)
        evaluator.wait()
        killed = time.monotonic()
        while any(_alive(pid) is not None for pid in sandboxes) and time.monotonic() - killed < 5:
            time.sleep(0.02)
        assert [pid for pid in sandboxes if _alive(pid) is not None] == []
        assert _marked(marker) == []
    finally:
        evaluator.kill()
        evaluator.wait()
        for pid in sandboxes:  # any left when the test failed: leave nothing behind
            if _alive(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for folder in set(Path(tempfile.gettempdir()).glob("clearlm-sandbox-*")) - folders:
            shutil.rmtree(folder, ignore_errors=True)  # the killed evaluator's, which nobody is left to remove
