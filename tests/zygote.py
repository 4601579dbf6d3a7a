"""Worker processes forked from one that has already imported torch, Celery and nasq.

Every test worker is a real ``python -m workers`` process: its own pid, session, log file,
Celery main process and prefork pool child. Started with ``subprocess.Popen``, each paid the
interpreter's start and the imports (torch alone is 2 s of CPU, paid again in the pool child)
before it did anything a test looks at; 65 workers in a run made that a third of the suite's CPU.
Here a *zygote* process, started once per test process, imports those modules once and forks a
worker on request; the child becomes the worker as ``python -P -m workers ARGS`` would (new
session, working directory, environment, stdin from /dev/null, stdout and stderr to the log file,
``sys.argv``, SIGPIPE ignored), then runs ``workers/__main__.py`` as ``__main__`` and exits as
the interpreter does (non-daemon threads joined, then the atexit functions).

Only what the imports cannot have fixed already is forked (``Zygote.can_fork``): a worker whose
environment differs from the zygote's in what the interpreter or a preloaded library reads when
it starts (``PYTHON*``, locale and time zone, thread counts, ``TRITON_INTERPRET``, matplotlib's,
billiard's and kombu's start-up variables, ``LD_*``), or whose ``--threads`` the preloaded torch
cannot take, is started with ``Popen`` as before. What a fork cannot give: a string hash seed of
its own (the workers share the zygote's); ``ps`` shows the zygote's command line.
The zygote never runs a torch operation (no thread pool exists when it forks).

Run as a script: ``python -P tests/zygote.py NAME`` (NAME: an abstract Unix socket);
``Zygote`` is the test process's side.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

#: read when the interpreter or a preloaded library starts (besides every PYTHON*, LC_* and LD_* variable)
FIXED_AT_START = {"LANG", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TRITON_INTERPRET",
                  "MPLBACKEND", "MPLCONFIGDIR", "REMAP_SIGTERM", "C_FAKEFORK", "MP_LOG", "KOMBU_LOG_CONNECTION",
                  "KOMBU_LOG_CHANNEL", "PICKLE_PROTOCOL"}

PRELOAD = ("torch", "numpy", "PIL.Image", "celery", "kombu", "redis", "billiard", "celery.bin.celery", "celery.bin.worker",
           "celery.apps.worker", "celery.worker.worker", "celery.concurrency.prefork", "celery.concurrency.asynpool",
           "celery.events", "celery.backends.redis", "kombu.transport.redis", "nasq.backends.torch_backend",
           "nasq.model.checkpoint", "nasq.model.cadene", "nasq.inference.shard", "nasq.data.sources", "workers.app",
           "workers.tasks", "workers.build_tasks", "nasq.results.report", "nasq.results.ending")


def fixed_at_start(env: dict) -> dict:
    return {k: v for k, v in env.items() if k in FIXED_AT_START or k.startswith(("PYTHON", "LC_", "LD_"))}


# ------------------------------------------------------------------------------ the zygote process

def _become_worker(req: dict, closing: list, ready: int) -> None:
    """In the forked child: become ``python -P -m workers *req['args']``; never returns."""
    code = 1
    try:
        for s in closing:
            s.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it: EPIPE, not death
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        os.close(ready)  # the zygote hands out the pid now: the session exists, as with Popen
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        import runpy

        sys.argv = ["-m", *req["args"]]
        interrupted = False
        try:
            runpy.run_module("workers", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:  # noqa: BLE001 - what python -m would print
            import traceback

            traceback.print_exc()
            code = 1
        threading._shutdown()  # the interpreter's exit: non-daemon threads, then atexit
        import atexit

        atexit._run_exitfuncs()
        if interrupted:
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - setting up failed: say so in the log when there is one
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _request(conn: socket.socket) -> dict | None:
    conn.settimeout(10)
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        line += chunk
    return json.loads(line)


def serve(name: str) -> None:
    for module in PRELOAD:
        __import__(module)
    import matplotlib  # as nasq.results.report does when a merge draws its plots

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(64)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    sel.register(sys.stdin, selectors.EVENT_READ, "parent")  # closed: the test process is gone
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "parent":
                if not sys.stdin.buffer.read1(4096):
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                try:
                    req = _request(conn)
                    if req is None:
                        conn.close()
                        continue
                    ready_r, ready_w = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(ready_r)
                        _become_worker(req, [listener, wake_r, wake_w, conn, *children.values()], ready_w)
                    os.close(ready_w)
                    os.read(ready_r, 1)  # EOF once the child has its own session (or is gone)
                    os.close(ready_r)
                    children[pid] = conn
                    conn.sendall(f"pid {pid}\n".encode())
                except Exception as e:  # noqa: BLE001 - one bad request must not end the zygote
                    print(f"zygote: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    try:
                        conn.sendall(f"error {type(e).__name__}: {e}\n".encode())
                    except OSError:
                        pass
            elif key.data == "child":
                try:
                    while wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
        while children:  # reap: each child's status goes to the one who asked for it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


# ------------------------------------------------------------------------------ the test process's side

class ForkedProcess:
    """What ``subprocess.Popen`` gives a caller, for a worker the zygote forked: ``pid``,
    ``poll``, ``wait``, ``returncode``, signals. Its exit status comes from the zygote; if the
    zygote is gone, a process that has ended is reported as killed (-9): its status is unknown."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str], buf: bytes = b""):
        self._conn, self.pid, self.args, self.returncode = conn, pid, args, None
        self._buf, self._lock = buf, threading.Lock()
        self._parse()

    def _parse(self) -> None:
        if self._buf.endswith(b"\n"):
            self.returncode = int(self._buf.split()[1])
            self._conn.close()

    def _read(self, timeout: float | None) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            self._conn.settimeout(timeout)
            try:
                chunk = self._conn.recv(4096)
            except (socket.timeout, BlockingIOError):
                return
            if chunk:
                self._buf += chunk
                self._parse()
                return
            if not _alive(self.pid):  # the zygote is gone: judge by the process itself
                self.returncode = -signal.SIGKILL
                self._conn.close()
                return
        time.sleep(0.05 if timeout is None else min(timeout, 0.05))

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _threads(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


class Zygote:
    """Starts the zygote (``RuntimeError`` if it does not say it is ready within ``timeout``)."""

    def __init__(self, env: dict, timeout: float = 120):
        self.name = f"nasq-zygote-{os.getpid()}-{os.urandom(4).hex()}"
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, "-P", os.path.abspath(__file__), self.name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     start_new_session=True)  # a Ctrl-C of the tests is not its to take
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout) or self.proc.stdout.readline().strip() != b"ready":
            self.close()
            raise RuntimeError(f"the zygote did not start (status {self.proc.returncode})")

    def can_fork(self, argv: list[str], env: dict) -> bool:
        """A ``python -P -m workers`` command whose environment agrees with the zygote's in what
        was fixed when it started, and whose ``--threads`` (if any) is the zygote's thread count."""
        threads = _threads(argv)
        return (self.proc.poll() is None and argv[:4] == [sys.executable, "-P", "-m", "workers"]
                and fixed_at_start(env) == fixed_at_start(self.env)
                and threads in (None, self.env.get("OMP_NUM_THREADS")) and threads in (None, self.env.get("MKL_NUM_THREADS")))

    def spawn(self, argv: list[str], logpath: str, env: dict) -> ForkedProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(60)
            conn.connect("\0" + self.name)
            conn.sendall(json.dumps({"args": argv[4:], "env": env, "cwd": os.getcwd(),
                                     "log": os.path.abspath(logpath)}).encode() + b"\n")
            reply = b""
            while b"\n" not in reply:
                chunk = conn.recv(4096)
                if not chunk:
                    raise RuntimeError("the zygote closed the connection before it forked")
                reply += chunk
        except BaseException:
            conn.close()
            raise
        first, rest = reply.split(b"\n", 1)
        if not first.startswith(b"pid "):
            conn.close()
            raise RuntimeError(f"the zygote could not fork: {first.decode(errors='replace')}")
        return ForkedProcess(conn, int(first.split()[1]), argv, rest)  # the exit may have come with the pid

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
