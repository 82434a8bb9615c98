"""The sandbox's child side, run as a script by `python -I -S -B` (see `clearlm.sandbox`): lock this process down,
fork the supervisor's child (and the PID namespace's init), then run the program and report that it ran to its end.

It is a module of its own, importing only what it uses from the standard library, because every sandboxed program
pays its start-up: interpreter, imports and the compilation of this file (-B caches nothing).
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import math
import os
import resource
import signal
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: typing costs the child milliseconds on every run
    from collections.abc import Callable
    from typing import Any, NoReturn

_OPEN_FILES = 256
_UID_BASE = 0x70000000  # as root, a sandbox runs as this plus the pid of its first process: unique while it runs

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


def _lock_down(config: dict[str, Any]) -> dict[str, Any]:
    """Apply every layer the platform allows to this process (and so to all it will start); return which held."""
    directory, limits = config["directory"], config["limits"]
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
        "RLIMIT_CPU": (resource.RLIMIT_CPU, math.ceil(limits["cpu_seconds"])),
        "RLIMIT_AS": (resource.RLIMIT_AS, limits["memory_bytes"]),
        "RLIMIT_FSIZE": (resource.RLIMIT_FSIZE, limits["file_bytes"]),
        "RLIMIT_NOFILE": (resource.RLIMIT_NOFILE, _OPEN_FILES),
    }
    if root or namespaces:  # the count includes this process and, with a PID namespace, the namespace's init
        rlimits["RLIMIT_NPROC"] = (resource.RLIMIT_NPROC, limits["processes"] + 1 + namespaces)
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
        print(marshal.dumps(layers).hex(), flush=True)
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
    config = marshal.loads(bytes.fromhex(sys.argv[1]))
    report = _child(config)
    exec(*_load_program(config["directory"]))
    report()


if __name__ == "__main__":
    _main()
