"""Runs inside the new namespaces as their first process: lock the filesystem, drop privileges, exec.

Started by `crucible.evaluate.sandbox.process` as `unshare ... python -I -S launch.py PARAMS` with
the untrusted program on stdin. Standard library only (it runs before, and apart from, crucible).

Steps: every mount read-only and nosuid (one recursive mount_setattr), a fresh size-limited tmpfs
on /tmp as the only writable place, privileges dropped (capability bounding set emptied,
no_new_privs, and uid/gid nobody when the sandbox was started by real root), rlimits set, then exec
the program. The program becomes process 1 of the PID namespace: when it exits, the kernel kills
every process it left behind, and killing it (or `unshare`, whose child it is) kills them all.
With `--probe` it checks that every step works and exits 0 instead of running a program.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_MOVE, _MS_REC = (
    0x1,
    0x2,
    0x4,
    0x1000,
    0x2000,
    0x4000,
)
_DEVICES = ("null", "zero", "full", "random", "urandom")
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38
_NOBODY = 65534


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _read_only(path: str) -> None:
    """Make the mount at `path` and every mount below it read-only and nosuid."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    ret = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(ret, f"mount_setattr({path}, read-only, recursive)")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    ret = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() or None,
    )
    _check(ret, f"mount {source} on {target}")


def _private_tmp(size_mb: int) -> None:
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size_mb}m,mode=1777")


def _minimal_dev() -> None:
    """Replace /dev by a tmpfs holding only null, zero, full, random, urandom and shm/."""
    stage = "/tmp/.dev"
    os.mkdir(stage)
    _mount("tmpfs", stage, "tmpfs", _MS_NOSUID, "size=64k,mode=755")
    for name in _DEVICES:
        open(f"{stage}/{name}", "w").close()
        _mount(f"/dev/{name}", f"{stage}/{name}", None, _MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{stage}/{name}")
    os.mkdir(f"{stage}/shm")
    _mount(stage, "/dev", None, _MS_MOVE)
    os.rmdir(stage)
    _read_only("/dev")
    # POSIX shared memory (multiprocessing's locks and queues) gets its own small tmpfs
    _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=16m,mode=1777")


def _hide_run() -> None:
    """An empty read-only /run: no daemon sockets (docker, dbus...) to connect to."""
    if os.path.isdir("/run"):
        _mount("tmpfs", "/run", "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k")


def _drop_privileges() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    if os.getuid() == 0 and os.environ.get("CRUCIBLE_SANDBOX_AS_NOBODY") == "1":
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def _limits(p: dict) -> None:
    for name, value in (
        ("RLIMIT_CPU", p["cpu_s"]),
        ("RLIMIT_AS", p["memory_bytes"]),
        ("RLIMIT_NPROC", p["nproc"]),
        ("RLIMIT_FSIZE", p["file_bytes"]),
        ("RLIMIT_NOFILE", p["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def main() -> None:
    probe = sys.argv[1] == "--probe"
    params = json.loads(sys.argv[-1])
    # The interpreter itself, not a virtualenv's link to it: the venv may sit under /tmp, which
    # the private tmpfs below hides (-I never reads the venv's site-packages anyway).
    interpreter = os.path.realpath(sys.executable)
    program = b"" if probe else sys.stdin.buffer.read()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _read_only("/")
    _private_tmp(params["tmp_mb"])
    _minimal_dev()
    _hide_run()
    _drop_privileges()
    os.chdir("/tmp")
    with open("/tmp/main.py", "wb") as f:
        f.write(program)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}  # fmt: skip
    if probe:
        os.remove("/tmp/main.py")
        print("ok", flush=True)
        return
    _limits(params)
    os.execve(interpreter, [interpreter, "-I", "/tmp/main.py"], env)


if __name__ == "__main__":
    main()
