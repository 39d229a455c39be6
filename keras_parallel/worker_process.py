"""How `keras-parallel launch` starts a worker: on a private network, tied to it.

TensorFlow's gRPC server listens on every interface whatever address
`TF_CONFIG` names, and it runs any graph a client sends it, unauthenticated.
Local workers therefore share a private network namespace (Linux: a user and a
network namespace, which an unprivileged user may create where the kernel
allows it) whose only interface is loopback: they reach each other on
127.0.0.1 and nobody else reaches them.

Each worker starts as `python -m keras_parallel.worker_process`, which asks the
kernel to kill it when the launcher dies (so a launcher killed by SIGKILL
leaves no orphans), joins the private network, then replaces itself with
`python script.py args...`.

Standard library only, as the launcher.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
NAMESPACES = ("user", "net")
_READY = "ready"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(function, *args) -> None:
    if function(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class PrivateNetwork:
    """A network namespace with loopback up, kept open by file descriptors.

    Made by a short-lived helper process (a process that creates a user
    namespace must be single-threaded, which the launcher with its output
    threads is not). Workers join it through `fds` (see `worker_command`).

    Raises:
        OSError: with the kernel's reason where no namespace can be made
            (not Linux, user namespaces disabled, a sandbox forbidding them).
    """

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(f"network namespaces need Linux, this is {sys.platform}")
        helper = subprocess.Popen(
            [sys.executable, "-m", __name__, "--make-network"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            answer = helper.stdout.readline().strip()
            if answer != _READY:
                raise OSError(answer or "the helper process failed")
            self.fds = [
                os.open(f"/proc/{helper.pid}/ns/{name}", os.O_RDONLY)
                for name in NAMESPACES
            ]
        finally:
            helper.stdin.close()
            helper.wait()
            helper.stdout.close()

    def close(self) -> None:
        """Closes the launcher's handles; the namespace lives on while a
        worker is in it."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def worker_command(
    script: str, args: Sequence[str], network: PrivateNetwork | None
) -> list[str]:
    """The command line that runs `script` as a worker of this process.

    Args:
        script: the user's training script.
        args: its arguments.
        network: the namespace to join, or None for this host's network.

    Returns:
        An argv for `subprocess.Popen`; pass `network.fds` as `pass_fds`.
    """
    if not sys.platform.startswith("linux"):
        return [sys.executable, script, *args]
    fds = ",".join(map(str, network.fds)) if network else "-"
    return [sys.executable, "-m", __name__, str(os.getpid()), fds, script, *args]


def _make_network() -> int:
    """Helper process: unshares, brings loopback up, then waits for the
    launcher to open the namespace and close our stdin."""
    uid, gid = os.getuid(), os.getgid()
    try:
        _call(_libc().unshare, _CLONE_NEWUSER | _CLONE_NEWNET)
        # Map our own ids to themselves: inside, the worker is still who it
        # is outside (files it writes belong to the user).
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
        _bring_loopback_up()
    except OSError as error:
        print(f"{error.strerror or error}", flush=True)
        return 1
    print(_READY, flush=True)
    sys.stdin.read()
    return 0


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _start_worker(argv: list[str]) -> None:
    """Worker bootstrap: die with the launcher, join its network, exec the script."""
    launcher, fds, script, *args = argv
    libc = _libc()
    _call(libc.prctl, _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(launcher):
        # The launcher died before the line above took effect.
        sys.exit(128 + signal.SIGKILL)
    if fds != "-":
        # The user namespace first: it grants the right to join the network.
        try:
            for fd in map(int, fds.split(",")):
                _call(libc.setns, fd, 0)
                os.close(fd)
        except OSError as error:
            sys.exit(
                "keras-parallel launch: a worker could not join the workers' "
                f"private network ({error.strerror}). Run with --network host "
                "(see README, 'Security', for what that exposes)."
            )
    os.execv(sys.executable, [sys.executable, script, *args])


if __name__ == "__main__":
    if sys.argv[1:] == ["--make-network"]:
        sys.exit(_make_network())
    _start_worker(sys.argv[1:])
