"""Run untrusted, model-written Python in a locked-down child process and report a short, stable verdict.

Code-generation evaluation executes programs that a model wrote (RL's reward verifiers, issue 18, are to). Such code
is hostile until proven otherwise, so the evaluator never imports or `exec`s it: each program runs in a fresh
`python -I -S -B` in its own session (process group), with a new temporary directory as its working directory, HOME
and TMPDIR, a clean environment and stdin closed. The evaluator enforces wall time and output size and kills the
whole process group when it stops a run. Inside the child, before the program starts, this module (run as a script)
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
import ctypes
import errno
import functools
import json
import math
import os
import re
import resource
import signal
import sys
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

TAIL_BYTES = 4096  # how much of stdout and stderr a verdict keeps (the end, where tracebacks are)
_OPEN_FILES = 256
_UID_BASE = 0x70000000  # as root, a sandbox runs as this plus the pid of its first process: unique while it runs
_POLL_SECONDS = 0.01  # how often the evaluator looks for the child's exit where no pidfd can tell it
_DRAIN_SECONDS = 1.0  # how long the evaluator waits for the pipes to close once it has killed the process group

# Linux ABI numbers used below, through ctypes: the os module has no Landlock or seccomp (and unshare from 3.12 on).
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 1, 8, 22, 38, 47
_CAP_DAC_READ_SEARCH = 2
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on every architecture
_LANDLOCK_EXECUTE, _LANDLOCK_WRITE_FILE, _LANDLOCK_READ_FILE, _LANDLOCK_READ_DIR = 1, 2, 4, 8
_LANDLOCK_TRUNCATE = 1 << 14
# (AUDIT_ARCH, numbers of the refused system calls: socket, io_uring_setup, open_by_handle_at)
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, (41, 425, 304)), "aarch64": (0xC00000B7, (198, 425, 265))}
_SYSTEM_LIBRARIES = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache", "/dev/urandom")

# Audit events that touch paths; "open" writes when its mode or flags say so.
_READING_EVENTS = ("open", "os.listdir", "os.scandir")
_WRITING_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.chmod", "os.chown")
_WRITING_EVENTS += ("os.truncate", "os.utime")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


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


# The evaluator's side. It imports what only it needs inside its functions: the child runs this file and starts
# faster without them.


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
    return json.loads(result.stdout)


def _command(config: dict[str, Any]) -> list[str]:
    """This file run as a script by the base interpreter (not a virtual environment's: -S ignores site-packages)."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return [python, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)]


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


# The child's side: this file run as a script.


def _lock_down(config: dict[str, Any]) -> dict[str, Any]:
    """Apply every layer the platform allows to this process (and so to all it will start); return which held."""
    directory, limits = config["directory"], Limits(**config["limits"])
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    root = os.geteuid() == 0
    namespaces = libc is not None and libc.unshare(_CLONE_NEWNET | _CLONE_NEWPID | (0 if root else _CLONE_NEWUSER)) == 0
    if root:  # root ignores RLIMIT_NPROC and may write anywhere: the program runs as a uid of nobody's
        uid = _UID_BASE + os.getpid()
        os.chown(directory, uid, uid)
    if libc is not None:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    abi = _landlock_abi(libc)
    landlock = abi if abi and _landlock(libc, abi, directory) else 0
    if root:
        # The Python installation may sit where only root can enter (/root/.pyenv): where Landlock now confines
        # reads, the new uid keeps reading everything.
        _become(libc, uid, keep_reading=landlock > 0)
    rlimits = {
        "RLIMIT_CORE": (resource.RLIMIT_CORE, 0),
        "RLIMIT_CPU": (resource.RLIMIT_CPU, math.ceil(limits.cpu_seconds)),
        "RLIMIT_AS": (resource.RLIMIT_AS, limits.memory_bytes),
        "RLIMIT_FSIZE": (resource.RLIMIT_FSIZE, limits.file_bytes),
        "RLIMIT_NOFILE": (resource.RLIMIT_NOFILE, _OPEN_FILES),
    }
    if root or namespaces:  # the count includes this process and, with a PID namespace, the namespace's init
        rlimits["RLIMIT_NPROC"] = (resource.RLIMIT_NPROC, limits.processes + 1 + namespaces)
    applied = [name for name, (which, value) in rlimits.items() if _set_limit(which, value)]
    return {
        "root": root,
        "namespaces": namespaces,
        "keeps_read_capability": root and landlock > 0,
        "process_limit": "RLIMIT_NPROC" in applied,
        "rlimits": applied,
        "landlock": landlock,
        "seccomp": libc is not None and _seccomp(libc),
        # Last: the kernel clears it whenever the uid or capabilities change, as they did above.
        "parent_death": _die_with_parent(signal.SIGKILL, lambda: os.getppid() == config["parent"]),
    }


def _die_with_parent(signum: int, parent_alive: Callable[[], bool]) -> bool:
    """Have the kernel send `signum` to this process when its parent exits (PR_SET_PDEATHSIG; with a parent of many
    threads, when the thread that started it exits), then take `signum` at once if the parent is already gone: it may
    have exited before. Whether the kernel does it."""
    if not sys.platform.startswith("linux"):
        return False
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return False
    if not parent_alive():
        os.kill(os.getpid(), signum)
    return True


def _open(fd: int) -> bool:
    """Whether a pipe that nobody writes to still has a write end open somewhere."""
    os.set_blocking(fd, False)
    try:
        os.read(fd, 1)  # b"": every write end is closed
    except BlockingIOError:
        return True
    return False


def _set_limit(which: int, value: int) -> bool:
    """Lower a soft and hard limit to `value` (CPU time: hard one second later, so SIGXCPU comes first)."""
    hard = value + 1 if which == resource.RLIMIT_CPU else value
    try:
        resource.setrlimit(which, (value, hard))
    except (ValueError, OSError):
        return False
    return True


def _become(libc: Any, uid: int, keep_reading: bool) -> None:
    """Switch from root to `uid`, dropping every capability but, if `keep_reading`, CAP_DAC_READ_SEARCH (also kept
    across exec, as an ambient capability, so the program can start Python again)."""
    if keep_reading:
        libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if not keep_reading:
        return
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    caps = (ctypes.c_uint32 * 6)(*([1 << _CAP_DAC_READ_SEARCH] * 3), 0, 0, 0)  # effective, permitted, inheritable
    if libc.capset(header, caps) != 0 or libc.prctl(_PR_CAP_AMBIENT, 2, _CAP_DAC_READ_SEARCH, 0, 0) != 0:
        raise SystemExit("clearlm-sandbox: could not drop capabilities")  # never go on with more


def _landlock_abi(libc: Any) -> int:
    if libc is None:
        return 0
    libc.syscall.restype = ctypes.c_long
    return max(int(libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))), 0)


def _readable() -> list[str]:
    """What the program may read besides its directory: this Python's installation and the system libraries."""
    python = os.path.dirname(os.path.realpath(sys.executable))
    paths = {python, os.path.realpath(sys.base_prefix), *_SYSTEM_LIBRARIES}
    return sorted(path for path in paths if os.path.exists(path))


def _landlock(libc: Any, abi: int, directory: str) -> bool:
    """Confine the file system to `directory` (everything), Python and system libraries (read and execute) and
    /dev/null; with ABI 4 refuse TCP, with ABI 6 signals and abstract unix sockets beyond the sandbox."""

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))

    fs_bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)  # ABI 2 adds REFER, 3 TRUNCATE, 5 IOCTL_DEV
    everything = (1 << fs_bits) - 1
    attr = (ctypes.c_uint64 * 3)(everything, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    truncate = _LANDLOCK_TRUNCATE if abi >= 3 else 0
    read = _LANDLOCK_READ_FILE | _LANDLOCK_EXECUTE
    rules = [(directory, everything), ("/dev/null", _LANDLOCK_READ_FILE | _LANDLOCK_WRITE_FILE | truncate)]
    rules += [(path, read | (_LANDLOCK_READ_DIR if os.path.isdir(path) else 0)) for path in _readable()]
    try:
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(access, fd)
                if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                    return False
            finally:
                os.close(fd)
        return libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0
    finally:
        os.close(ruleset)


def _seccomp(libc: Any) -> bool:
    """Install a classic-BPF filter: system calls of another ABI (i386's socketcall, x32) kill the process; socket,
    io_uring_setup and open_by_handle_at fail with EACCES; everything else is allowed."""
    arch = _SECCOMP_ARCHES.get(os.uname().machine)
    if arch is None:
        return False
    audit_arch, refused = arch
    deny = len(refused) + 6  # index of the final "deny" instruction

    class Instruction(ctypes.Structure):
        _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))

    class Program(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction)))

    load, equal, at_least, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    code = [
        (load, 0, 0, 4),  # the architecture
        (equal, 1, 0, audit_arch),
        (ret, 0, 0, 0x80000000),  # SECCOMP_RET_KILL_PROCESS
        (load, 0, 0, 0),  # the system call number
        (at_least, deny - 5, 0, 0x40000000),  # x32
        *((equal, deny - 6 - i, 0, number) for i, number in enumerate(refused)),
        (ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
        (ret, 0, 0, 0x00050000 | errno.EACCES),  # SECCOMP_RET_ERRNO
    ]
    instructions = (Instruction * len(code))(*code)
    program = Program(len(code), instructions)
    return libc.prctl(_PR_SET_SECCOMP, 2, ctypes.byref(program), 0, 0) == 0  # SECCOMP_MODE_FILTER


def _refuse_in_python(directory: str) -> None:
    """The audit hook: refuse file access outside what Landlock allows and any socket but a socketpair, raising
    PermissionError("blocked: ...") so the verdict can name what was tried."""
    writable = (directory, "/dev/null")
    readable = (*writable, *_readable())

    def within(path: object, roots: tuple[str, ...]) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return True  # a file descriptor: already open
        real = os.path.realpath(os.fsdecode(path))
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in _READING_EVENTS or event in _WRITING_EVENTS:
            if event == "open":  # (path, mode, flags)
                paths, writes = args[:1], any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & _WRITE_FLAGS
            else:  # the path, and the second one of rename, link and symlink
                paths, writes = args[:2], event in _WRITING_EVENTS
            outside = [path for path in paths if not within(path, writable if writes else readable)]
            if outside:
                raise PermissionError(f"blocked: filesystem ({event} {outside[0]!r})")
        elif event in ("socket.connect", "socket.bind") or (event == "socket.__new__" and args[1] != 1):  # AF_UNIX
            raise PermissionError(f"blocked: network ({event})")

    sys.addaudithook(hook)


def _supervise(child: int, config: dict[str, Any]) -> NoReturn:
    """Wait for `child`, reaping any orphan meanwhile (a PID namespace's init must), and exit as it did: its exit
    status, or 128+N if signal N killed it. The pipes to the evaluator are the program's alone: they are closed here."""
    os.close(config["report_fd"])
    os.close(config["secret_fd"])
    while True:
        pid, status = os.wait()
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _child(config: dict[str, Any]) -> Callable[[], None]:
    """Lock down, then fork the program's process; return only in it, with the function that reports that the program
    ran to its end. The first process stays as supervisor, with an alarm that kills the group should the evaluator
    neither do so nor die; with a PID namespace, its child is the namespace's init, whose exit makes the kernel kill
    every process left in it. Each dies with its parent: the supervisor with the evaluator (set in `_lock_down`), its
    child with the supervisor; without a PID namespace, the supervisor kills its group when the evaluator dies."""
    layers = _lock_down(config)
    if config["require"] is None:
        print(json.dumps(layers), flush=True)
        os._exit(0)
    if layers != config["require"]:
        missing = sorted(key for key, value in config["require"].items() if layers[key] != value)
        raise SystemExit(f"clearlm-sandbox: could not apply {', '.join(missing)}")
    os.write(config["report_fd"], b"1")
    lifeline, held = os.pipe()  # the supervisor holds `held` open while it lives; its child sees it through `lifeline`
    program = os.fork()
    if program:
        os.close(lifeline)
        signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGKILL))
        signal.alarm(math.ceil(config["limits"]["wall_seconds"]) + 2)
        if layers["parent_death"] and not layers["namespaces"]:  # no namespace to empty: kill the group, then die
            _die_with_parent(signal.SIGALRM, lambda: os.getppid() == config["parent"])  # SIGKILL until here
        _supervise(program, config)
    os.close(held)
    if layers["parent_death"]:  # not inherited across fork: set again, now that the supervisor is the parent
        _die_with_parent(signal.SIGKILL, lambda: _open(lifeline))  # getppid() is 0 in a PID namespace
    os.close(lifeline)
    if layers["namespaces"]:
        program = os.fork()
        if program:
            _supervise(program, config)
    os.set_inheritable(config["report_fd"], False)  # nothing the program executes gets it
    _refuse_in_python(config["directory"])
    return _reporter(config["report_fd"], config["secret_fd"])


def _reporter(report_fd: int, secret_fd: int) -> Callable[[], None]:
    """Read the nonce and close its pipe; return the function that writes it to the evaluator, in this process only
    (not in a fork of it). The nonce is kept only in that function's closure."""
    nonce = os.read(secret_fd, 64)
    os.close(secret_fd)
    pid, getpid, write = os.getpid(), os.getpid, os.write  # bound now: the program may replace os's functions

    def report() -> None:
        if getpid() == pid:
            write(report_fd, nonce)

    return report


def _load_program(directory: str) -> tuple[types.CodeType, dict[str, Any]]:
    """The program, compiled, and the namespace of a fresh module __main__ to run it in, with nothing around it that
    catches exceptions, so that an uncaught one ends it the usual way: traceback, status 1."""
    path = os.path.join(directory, "program.py")
    with open(path, encoding="utf-8") as file:
        code = compile(file.read(), path, "exec")
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    sys.argv = [path]
    sys.path.insert(0, directory)
    return code, main.__dict__


def _main() -> None:
    """Run the program; report that it ran to its end only if `exec` returns. An uncaught exception, SystemExit
    included, goes past the report and ends the process the usual way."""
    config = json.loads(sys.argv[1])
    report = _child(config)
    exec(*_load_program(config["directory"]))
    report()


if __name__ == "__main__":
    _main()
