"""Warm start: a `dvc repro` pays the torch/transformers import once, not once per stage.

Every DVC stage is a fresh ``python pipeline/<script>.py``, and about 3.5 s of each one's start-up
on a 2-core CPU is importing torch and transformers (docs/speed.md, "Warm start"). Here the
first stage that finds no warm server starts one in the background and runs as usual; the server
imports those third-party libraries and then forks one child per later stage. The stage's own
process stays the one DVC waits for: it hands its argv, working directory, environment, umask and
stdin/stdout/stderr to the server, the child runs the script exactly as ``python`` would, and the
stage process exits with the child's status, forwarding SIGINT/SIGTERM/SIGHUP to it meanwhile.

What keeps a child equal to a fresh process:

* The server never imports this package (it loads this file under a private name), so every
  ``hrkd`` module a stage runs is read from disk by the child: an edited module is always the one
  DVC reruns the stage for.
* A server serves only clients with the same interpreter, ``sys.path``, interpreter flags,
  environment (less the variables DVC sets per stage), versions of the preloaded libraries (their
  files' mtimes) and this file: anything a library reads at import time is what a fresh process
  would read. Otherwise a client starts a server of its own.
* It never initialises CUDA or runs a torch op before forking; a CUDA build of torch is not served
  at all (the GPU machine's stages run as plain processes), nor are torchrun workers.

Linux only (abstract sockets, ``SO_PEERCRED``); elsewhere, with ``HRKD_WARM=0``, or when anything
goes wrong before the child starts, the stage simply runs in its own process. A server exits
after ``HRKD_WARM_IDLE`` seconds (default 60) without a stage to run; it serves only its own user.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

ENV_SWITCH = "HRKD_WARM"  # "0" turns warm start off
ENV_IDLE = "HRKD_WARM_IDLE"  # seconds a server waits for its next stage
ENV_CHILD = "HRKD_WARM_CHILD"  # set inside a served stage: never delegate again
DEFAULT_IDLE = 60.0

# What the server imports: the libraries that make a stage's start-up slow. Not pandas/pyarrow
# (0.3 s, and pyarrow's allocator starts a thread of its own) and nothing of this package.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.bert.modeling_bert",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "tokenizers",
    "safetensors.torch",
    "dvclive",
    "tqdm.auto",
    "typer",
    "pydantic",
    "yaml",
)
# Set by DVC per stage (or by the shell per command): they must not make every stage a new server.
VOLATILE_ENV = ("DVC_STAGE", "DVC_ROOT", "PWD", "OLDPWD", "SHLVL", "_", ENV_CHILD)
VOLATILE_PREFIXES = ("DVC_EXP_",)
# Forwarded to a served stage (SIGHUP is absent off POSIX, where warm start is off anyway).
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_MAX_REQUEST = 1 << 24


# ---------------------------------------------------------------------------------------------
# Client: the stage's own process
# ---------------------------------------------------------------------------------------------


def enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether this process may hand its stage to a warm server."""
    env = os.environ if environ is None else environ
    return (sys.platform.startswith("linux") and env.get(ENV_SWITCH, "1") != "0" and ENV_CHILD not in env
            and "LOCAL_RANK" not in env and "WORLD_SIZE" not in env)


def server_key(environ: dict[str, str] | None = None) -> str:
    """What a server must share with a client to run its stage as a fresh process would."""
    import hashlib
    from importlib.util import find_spec

    env = dict(os.environ if environ is None else environ)
    stable_env = sorted((k, v) for k, v in env.items()
                        if k not in VOLATILE_ENV and not k.startswith(VOLATILE_PREFIXES))
    libraries = []
    for name in sorted({m.split(".")[0] for m in PRELOAD}):
        spec = find_spec(name)
        origin = spec.origin if spec is not None else None
        libraries.append((name, origin, os.stat(origin).st_mtime_ns if origin and os.path.exists(origin) else None))
    this = Path(__file__)
    parts = [sys.executable, sys.version, repr(sys.flags), repr(sys.warnoptions), repr(sorted(sys._xoptions.items())),
             sys.path[1:], stable_env, libraries, str(this), this.stat().st_mtime_ns, os.getuid()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def address(key: str) -> str:
    """The server's abstract socket name: nothing on disk to clean up, gone when the server is."""
    return f"\0hrkd-warm-{os.getuid()}-{key}"


def delegate(argv: list[str] | None = None) -> int | None:
    """Run this stage (``argv``, default ``sys.argv``) in a warm child and return its exit status.

    None when the stage must run here: warm start off or unavailable, no server yet (one is then
    started for the next stage), or the server declined. A child killed by a signal returns the
    negative signal number, as :mod:`subprocess` does.
    """
    if not enabled():
        return None
    argv = list(sys.argv if argv is None else argv)
    try:
        key = server_key()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        conn.connect(address(key))
    except OSError:
        conn.close()
        start_server(key)
        return None
    return _run_remote(conn, argv)


def start_server(key: str) -> None:
    """Start a detached server for ``key`` (it exits at once if another one holds the address)."""
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('_hrkd_warm_server', sys.argv[1]); "
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
            "mod.serve(sys.argv[2], sys.argv[3:])")
    # The stage's own interpreter flags (-X, -W, -O...): they are part of the key.
    flags = subprocess._args_from_interpreter_flags()
    subprocess.Popen([sys.executable, *flags, "-c", code, __file__, key, *sys.path[1:]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True, start_new_session=True)


def _run_remote(conn: socket.socket, argv: list[str]) -> int | None:
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
                          "umask": umask}).encode()
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    with conn:
        try:
            # The fds ride on the 7-byte header; the request follows as plain stream data.
            header = struct.pack("!I3b", len(request), *[int(fd in fds) for fd in (0, 1, 2)])
            socket.send_fds(conn, [header], fds)
            conn.sendall(request)
            reader = conn.makefile("rb")
            first = reader.readline().split()
        except OSError:
            first = []
        if first[:1] != [b"pid"]:
            return None  # declined, or the server is going away: nothing ran, run here
        child = int(first[1])
        previous = {sig: signal.signal(sig, lambda s, _f: _forward(child, s)) for sig in SIGNALS}
        try:
            last = reader.readline().split()
        except OSError:
            last = []
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if last[:1] == [b"exit"]:
        return int(last[1])
    if last[:1] == [b"signal"]:
        return -int(last[1])
    sys.stderr.write("error: the warm server went away while it ran this stage; rerun it with HRKD_WARM=0\n")
    return 1


def _forward(child: int, sig: int) -> None:
    try:
        os.killpg(child, sig)
    except OSError:
        pass


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def exit_like(status: int) -> None:
    """Leave this process as the child left: its exit code, or death by the same signal."""
    if status < 0:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    raise SystemExit(status)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def serve(key: str, path: list[str], idle: float | None = None) -> None:
    """Hold ``address(key)``, import ``PRELOAD``, then fork a child for every stage sent to it."""
    sys.path[:] = path
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address(key))  # before the imports: a second server for this key stops here
    except OSError:
        return
    os.chdir("/")  # hold no project folder open
    _Server(listener, float(os.environ.get(ENV_IDLE, DEFAULT_IDLE)) if idle is None else idle).run()


class _Server:
    def __init__(self, listener: socket.socket, idle: float) -> None:
        self.listener = listener
        self.idle = idle
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (connection, pid)
        self.clients: dict[int, int] = {}  # connection fd -> pidfd, while its client is still there
        self.served = 0

    def run(self) -> None:
        import importlib
        import select

        try:
            for name in PRELOAD:
                importlib.import_module(name)
            import torch

            os.close(os.pidfd_open(os.getpid()))  # Linux 5.3+: how the loop learns that a child exited
            self.serving = not torch.backends.cuda.is_built()
        except Exception:  # a broken library or an old kernel: every stage runs as a plain process
            self.serving = False
        self.listener.listen(16)
        while True:
            watched = [c for c, _ in self.children.values() if c.fileno() in self.clients]
            ready, _, _ = select.select([self.listener, *watched, *self.children], [], [], self.idle)
            if not ready and not self.children:
                return
            for item in ready:
                if item is self.listener:
                    self._accept()
                elif isinstance(item, int):  # a child's pidfd: it exited
                    self._reap(item)
                else:  # a client sends nothing after its request: readable means it went away
                    _forward(self.children[self.clients.pop(item.fileno())][1], signal.SIGTERM)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        started = self._start_child(conn)
        if started is None:
            conn.close()
            return
        self.children[started[0]] = (conn, started[1])
        self.clients[conn.fileno()] = started[0]

    def _reap(self, pidfd: int) -> None:
        conn, pid = self.children.pop(pidfd)
        self.clients.pop(conn.fileno(), None)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        reply = (f"signal {os.WTERMSIG(status)}\n" if os.WIFSIGNALED(status)
                 else f"exit {os.waitstatus_to_exitcode(status)}\n")
        try:
            conn.sendall(reply.encode())
        except OSError:
            pass
        conn.close()

    def _start_child(self, conn: socket.socket) -> tuple[int, int] | None:
        """Answer one request on ``conn``: fork its child ((pidfd, pid)), or reply and return None."""
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            return None
        conn.settimeout(10)
        fds: list[int] = []
        try:
            head, fds, _, _ = socket.recv_fds(conn, 7, 3)
            size, *present = struct.unpack("!I3b", head + _recv_exact(conn, 7 - len(head)))
            if size == 0:  # a status query
                conn.sendall(f"pong {os.getpid()} {self.served} {int(self.serving)}\n".encode())
                raise ValueError("not a stage")
            if size > _MAX_REQUEST or sum(present) != len(fds):
                raise ValueError("malformed request")
            request = json.loads(_recv_exact(conn, size))
            if not self.serving:
                conn.sendall(b"decline\n")
                raise ValueError("declined")
        except (OSError, ValueError, struct.error):
            for fd in fds:
                os.close(fd)
            return None
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            try:
                self.listener.close()
                for other, _ in self.children.values():
                    other.close()
                for pidfd in self.children:
                    os.close(pidfd)
                conn.close()
                _child(request, fds, present)
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        self.served += 1
        conn.sendall(f"pid {pid}\n".encode())
        return os.pidfd_open(pid), pid


def status(environ: dict[str, str] | None = None) -> dict[str, int] | None:
    """The warm server this process's stages would use: its pid, stages served, whether it serves."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10)
        conn.connect(address(server_key(environ)))
        socket.send_fds(conn, [struct.pack("!I3b", 0, 0, 0, 0)], [])
        reply = conn.makefile("rb").readline().split()
    except OSError:
        return None
    finally:
        conn.close()
    if reply[:1] != [b"pong"]:
        return None
    return {"pid": int(reply[1]), "served": int(reply[2]), "serving": int(reply[3])}


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def _child(request: dict, fds: list[int], present: list[int]) -> None:
    """Become the stage: its process group, fds, directory, environment and argv; run; exit."""
    import atexit
    import importlib
    import runpy
    import threading
    import traceback

    import ctypes

    os.setpgid(0, 0)
    try:  # PR_SET_PDEATHSIG: a child never outlives its server (whose client then reports it)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    for sig in SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    received = iter(fds)
    for target, here in zip((0, 1, 2), present):
        source = next(received) if here else os.open(os.devnull, os.O_RDWR)
        os.dup2(source, target)
        os.close(source)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[ENV_CHILD] = "1"
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    importlib.invalidate_caches()
    code: int | None = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            sys.stderr.write(f"{stop.code}\n")
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = None
    except BaseException:
        traceback.print_exc()
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code is None:  # an uncaught Ctrl-C ends a plain python by SIGINT too
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``python -m hrkd.warm [status|stop]``: the warm server of this shell's environment."""
    command = (sys.argv[1:] if argv is None else argv) or ["status"]
    info = status()
    if command[0] == "status":
        print(json.dumps(info) if info else "no warm server for this environment")
        return 0
    if command[0] == "stop":
        if info:
            os.kill(info["pid"], signal.SIGTERM)
        return 0
    sys.stderr.write(f"error: unknown command {command[0]!r}; use status or stop\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
