"""Run untrusted, model-written Python in a locked-down child process and report a short, stable verdict.

Code-generation evaluation executes programs that a model wrote (RL's reward verifiers, issue 18, are to). Such code
is hostile until proven otherwise, so the evaluator never imports or `exec`s it: each program runs in a fresh
`python -I -S -B` in its own session (process group), with a new temporary directory as its working directory, HOME
and TMPDIR, a clean environment and stdin closed. The evaluator enforces wall time and output size and kills the
whole process group when it stops a run. Inside the child, before the program starts, `child.py` (run as a script)
applies every layer the platform allows; `enforcement()` reports which ones hold here, so results can record it:

- resource limits: CPU time, address space, file size, open files, no core files, and a process count. RLIMIT_NPROC
  counts every process of a user (and root is exempt), so it is made per sandbox: as root the program runs under a
  uid of its own, otherwise in a new user namespace, where the count is per namespace;
- new network and PID namespaces: no network but a loopback that is down, and when the program's main process exits
  the kernel kills whatever it left behind, daemons that left the process group included;
- Landlock: write only in the temporary directory; read only there, in the Python installation and in the system
  libraries; no TCP; no signals or abstract unix sockets to anything outside the sandbox;
- seccomp: socket(2) is refused, which also covers the named unix sockets that a network namespace does not isolate,
  and so are io_uring and open_by_handle_at, which would get around it and Landlock;
- a Python audit hook that refuses the same file and socket access with a recognisable error, so the verdict can say
  "blocked: filesystem" or "blocked: network". It is not a boundary on its own (ctypes gets around it); where it is
  the only layer, `enforcement()` says so;
- no orphans: a sandbox dies with its evaluator, even one killed by SIGKILL, which cannot stop it. The kernel kills
  the supervisor when the evaluator's thread that started it exits (PR_SET_PDEATHSIG), then the supervisor's child,
  the PID namespace's init, and with it every process in the namespace; without a PID namespace the supervisor kills
  its process group instead. So `run_python` starts and reaps its supervisor in the calling thread, which lives until
  then, and `run_many` runs each program in one pool thread from start to end.

Linux gets all the layers that its kernel allows; other platforms get the resource limits and the audit hook only.
The program gets the standard library only (-S), and no /dev/shm: multiprocessing's pools and locks fail.

A program passes only if it runs to its end, as in HF evaluate's code_eval and OpenAI's human-eval, which record the
result once `exec` returns: exiting with status 0 is not enough. Otherwise a completion could skip the asserts that
follow it with os._exit(0), sys.exit(0), `raise SystemExit`, an atexit handler or a signal handler that exits 0. So
the evaluator passes the child a random nonce on a pipe that the child reads and closes before the program starts, and
the program's process writes it to a second pipe once the program's code has returned (not in a forked copy, not
after an exec); the verdict needs both that and status 0. The nonce is then only in a closure, named nowhere the
program is likely to look. This stops a program that exits early, the realistic way to game a reward; it does not
stop one that sets out to defeat it: such a program can reach the closure through its frames (sys._getframe), the gc
module or its own memory (ctypes), then call it, or take the nonce from it, and exit early. Threads the program
leaves running do not matter: it passes once its code has returned, whatever daemon threads still do (as in code_eval).

The verdict's `reason` is short and stable, so that reports can count it:

- "passed": the program ran to its end and exited with status 0;
- "failed: <ExceptionType>": an uncaught exception (status 1);
- "failed: exit <status>": another non-zero status, e.g. sys.exit(3);
- "failed: exited before the end": status 0, but the program's code never returned: os._exit(0), sys.exit(0), ...;
- "blocked: filesystem", "blocked: network": the audit hook refused access;
- "timeout", "output limit": the evaluator stopped it at the wall time or output size limit;
- "cpu time limit", "memory limit", "file size limit": it ran into a resource limit;
- "crashed: <SIGNAL>": a signal killed it;
- "sandbox error": the child could not apply every layer that `enforcement()` reported, and did not run the program.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import marshal
import math
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Any

TAIL_BYTES = 4096  # how much of stdout and stderr a verdict keeps (the end, where tracebacks are)
_POLL_SECONDS = 0.01  # how often the evaluator looks for the child's exit where no pidfd can tell it
_DRAIN_SECONDS = 1.0  # how long the evaluator waits for the pipes to close once it has killed the process group


@dataclass(frozen=True)
class Limits:
    """What one program may use. CPU time, memory and file size are per process, so a program that forks may use up
    to `processes` times as much; `processes` counts threads too, the program's own main thread included."""

    wall_seconds: float = 10.0
    cpu_seconds: float = 10.0
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # stdout and stderr together
    file_bytes: int = 16 << 20  # the largest file it may write
    processes: int = 16

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"Limits.{name} must be positive, not {value}")


@dataclass(frozen=True)
class Verdict:
    """How one program ended. `reason` is one of the short, stable strings listed in the module docstring: "passed",
    "failed: <ExceptionType>", "failed: exit <status>", "failed: exited before the end", "blocked: filesystem",
    "blocked: network", "timeout", "cpu time limit", "memory limit", "output limit", "file size limit",
    "crashed: <SIGNAL>" or "sandbox error"."""

    passed: bool
    reason: str
    returncode: int | None  # the child's exit status, 128+N for signal N; None when the evaluator stopped it
    stdout: str  # the last TAIL_BYTES
    stderr: str
    seconds: float


def run_python(code: str, limits: Limits = Limits()) -> Verdict:
    """Run `code` as the main module of a sandboxed Python process (see the module docstring). It passes if it runs
    to its end and exits with status 0: a completion that exits early, even with status 0, fails with "failed: exited
    before the end"."""
    import shutil
    import tempfile

    layers = _probe()
    directory = tempfile.mkdtemp(prefix="clearlm-sandbox-")
    try:
        with open(os.path.join(directory, "program.py"), "w", encoding="utf-8") as file:
            file.write(code)
        return _run(directory, limits, layers)
    finally:
        _unlock(directory)
        shutil.rmtree(directory, ignore_errors=True)


def run_many(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Verdict]:
    """Run several programs, `workers` (default: one per CPU) at a time, and return their verdicts in input order.
    Threads suffice: each only waits on its child process. Each program starts and ends in one pool thread, which
    lives until then: the kernel kills a sandbox whose starting thread exits (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda code: run_python(code, limits), programs))


def enforcement() -> dict[str, str]:
    """Which protections hold on this machine, measured by starting a sandbox, so that evaluation results can record
    it. Each value starts with "enforced" or "not enforced" and says by what, or why not."""
    layers = _probe()
    landlock, namespaces = layers["landlock"], layers["namespaces"]
    network = ", ".join(
        name
        for name, held in (
            ("network namespace", namespaces),
            ("seccomp refuses socket()", layers["seccomp"]),
            ("Landlock refuses TCP", landlock >= 4),
        )
        if held
    )
    uid = "a uid of its own" + (", keeping only CAP_DAC_READ_SEARCH" if layers["keeps_read_capability"] else "")
    return {
        "network": f"enforced: {network}" if network else "not enforced: audit hook only (ctypes bypasses it)",
        "filesystem": (
            f"enforced: Landlock ABI {landlock}; writes only its directory, reads it, Python and system libraries"
            if landlock
            else "not enforced: audit hook only (ctypes bypasses it)"
        ),
        "processes": (
            f"enforced: RLIMIT_NPROC counted per sandbox ({'own uid' if layers['root'] else 'user namespace'})"
            if layers["process_limit"]
            else "not enforced: RLIMIT_NPROC would count every process of this user"
        ),
        "leftover processes": (
            "enforced: PID namespace, all killed when the program exits or is stopped"
            if namespaces
            else "not enforced for processes that leave the process group (setsid); the group is killed"
        ),
        "orphans": (
            "enforced: if the evaluator dies (even by SIGKILL), the kernel kills the supervisor (PR_SET_PDEATHSIG), "
            "then the PID namespace's init and every process in the namespace"
            if layers["parent_death"] and namespaces
            else "not enforced for processes that leave the process group (setsid): if the evaluator dies, the "
            "supervisor kills its group (PR_SET_PDEATHSIG)"
            if layers["parent_death"]
            else "not enforced: a sandbox whose evaluator died lives until its supervisor's alarm (wall time + 2 s)"
        ),
        "identity": f"enforced: {uid}" if layers["root"] else "not enforced: runs as the evaluator's user",
        "resources": f"enforced: {', '.join(layers['rlimits'])} per process; wall time and output by the evaluator",
        "disk": "not enforced: RLIMIT_FSIZE bounds each file, not how many the program writes before its time is up",
        "audit hook": "enforced, but bypassable: reports file and socket access as 'blocked: ...'",
        "pass integrity": "enforced against exiting early (os._exit, sys.exit, signals): a pass needs the program to "
        "reach its end; not against code that finds the runner's report function in its own frames",
    }


@functools.cache
def _probe() -> dict[str, Any]:
    """The layers a sandbox gets here, found once by starting one: every later run must get the same, or ends in
    "sandbox error" rather than run with less than `enforcement()` reported."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="clearlm-sandbox-") as directory:
        config = {"directory": directory, "limits": asdict(Limits()), "require": None}
        config |= {"report_fd": None, "secret_fd": None, "parent": os.getpid()}
        command, environment = _command(config), _environment(directory)
        result = subprocess.run(command, cwd=directory, env=environment, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"the sandbox cannot start here: {result.stderr.strip()}")
    return marshal.loads(bytes.fromhex(result.stdout))


def _command(config: dict[str, Any]) -> list[str]:
    """The child module run as a script by the base interpreter (not a virtual environment's: -S ignores
    site-packages), its configuration marshalled (marshal needs no import there)."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
    return [python, "-I", "-S", "-B", child, marshal.dumps(config).hex()]


def _environment(directory: str) -> dict[str, str]:
    """Nothing inherited from the evaluator, whose environment may hold secrets."""
    return {"PATH": "/usr/bin:/bin", "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8", "TZ": "UTC"}


def _run(directory: str, limits: Limits, layers: dict[str, Any]) -> Verdict:
    import selectors
    import subprocess
    import time

    # The child reports on one pipe that its layers are in place and, with the nonce it reads from the other, that the
    # program ran to its end.
    nonce = os.urandom(16)
    report, report_fd = os.pipe()
    secret_fd, secret = os.pipe()
    config = {"directory": directory, "limits": asdict(limits), "require": layers}
    config |= {"report_fd": report_fd, "secret_fd": secret_fd, "parent": os.getpid()}
    start = time.monotonic()
    try:
        os.write(secret, nonce)  # far less than a pipe holds: it waits there for the child
        child = subprocess.Popen(
            _command(config),
            cwd=directory,
            env=_environment(directory),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=(report_fd, secret_fd),
        )
    except BaseException:
        os.close(report)
        raise
    finally:
        for fd in (report_fd, secret_fd, secret):
            os.close(fd)
    # Only the last TAIL_BYTES of each stream are kept, so the evaluator's memory stays bounded whatever is printed.
    pipes = [pipe for pipe in (child.stdout, child.stderr) if pipe is not None]  # both: asked for above
    tails = {pipe.fileno(): bytearray() for pipe in pipes}
    selector = selectors.DefaultSelector()
    for fd in tails:
        selector.register(fd, selectors.EVENT_READ)
    written = 0

    def read(timeout: float) -> None:
        nonlocal written
        for key, _ in selector.select(max(timeout, 0)):
            if key.fd in tails:
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    continue
                written += len(data)
                tails[key.fd] += data
                del tails[key.fd][:-TAIL_BYTES]

    def watch() -> str:
        """Wait until the child exits, or stop it: "timeout" or "output limit"."""
        deadline = start + limits.wall_seconds
        exit_fd = os.pidfd_open(child.pid) if hasattr(os, "pidfd_open") else None  # wakes the wait at exit
        if exit_fd is not None:
            selector.register(exit_fd, selectors.EVENT_READ)
        try:
            while not _exited(child.pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                read(remaining if exit_fd is not None else min(remaining, _POLL_SECONDS))
                if written > limits.output_bytes:
                    return "output limit"
            return ""
        finally:
            if exit_fd is not None:
                selector.unregister(exit_fd)
                os.close(exit_fd)

    stopped = ""
    try:
        stopped = watch()
    finally:
        _kill_group(child.pid)  # not reaped yet, so its process group id cannot have been reused
        drain_until = time.monotonic() + _DRAIN_SECONDS  # the pipes close once every process of the sandbox is gone
        while selector.get_map() and time.monotonic() < drain_until:
            read(drain_until - time.monotonic())
        selector.close()
        for pipe in pipes:
            pipe.close()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        reported = _reported(report, 1 + len(nonce))
    stdout, stderr = (tail.decode("utf-8", "replace") for tail in tails.values())
    if not stopped and written > limits.output_bytes:
        stopped = "output limit"
    set_up, completed = reported[:1] == b"1", reported == b"1" + nonce
    cpu = usage.ru_utime + usage.ru_stime
    reason = stopped or (_reason(child.returncode, completed, stderr, cpu, limits) if set_up else "sandbox error")
    returncode = None if stopped else child.returncode
    return Verdict(reason == "passed", reason, returncode, stdout, stderr, time.monotonic() - start)


def _reported(fd: int, size: int) -> bytes:
    """What the child wrote on its report pipe, up to `size` bytes: b"1" once its layers are in place, before the
    program starts (so the program cannot fake it), then the nonce once the program's code has returned."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, size)  # the child has exited: all it wrote is there
    except BlockingIOError:  # nothing written, and a copy of the pipe lives on (in a fork of the evaluator)
        return b""
    finally:
        os.close(fd)


def _exited(pid: int) -> bool:
    """Whether `pid` has exited, without reaping it (WNOWAIT)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # all gone (macOS: EPERM for a group of zombies)
        os.killpg(pgid, signal.SIGKILL)


def _reason(returncode: int, completed: bool, stderr: str, cpu_seconds: float, limits: Limits) -> str:
    if returncode == 0:
        return "passed" if completed else "failed: exited before the end"
    signum = returncode - 128 if returncode > 128 else -returncode
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_seconds >= math.ceil(limits.cpu_seconds)):
        return "cpu time limit"
    if signum > 0:
        return f"crashed: {signal.Signals(signum).name if signum in signal.valid_signals() else signum}"
    last = stderr.rstrip().rpartition("\n")[2]
    if last.startswith("MemoryError"):
        return "memory limit"
    if f"[Errno {errno.EFBIG}]" in last:  # Python ignores SIGXFSZ, so the write fails instead
        return "file size limit"
    blocked = re.match(r"PermissionError: (blocked: \w+)", last)
    if blocked:
        return blocked[1]
    exception = re.match(r"([A-Za-z_][\w.]*)(:|$)", last)
    return f"failed: {exception[1]}" if exception and returncode == 1 else f"failed: exit {returncode}"


def _unlock(directory: str) -> None:
    """Make every folder the program left writable again, so that the evaluator can remove them (a program running as
    the evaluator's user may have made them read-only). Symbolic links are left alone: they may point outside."""
    os.chmod(directory, 0o700)
    for parent, folders, _ in os.walk(directory):
        for name in folders:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
