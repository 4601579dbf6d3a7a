"""Worker processes forked from one that has already imported torch, Celery and nasq.

Every test worker is a real ``python -m workers`` process: its own pid, process group, log file,
Celery main process and prefork pool child. Started with ``subprocess.Popen``, each paid the
interpreter's start and the imports (torch alone is 2 s of CPU, paid again in the pool child)
before it did anything a test looks at; 65 workers in a run made that a third of the suite's CPU.
Here a *zygote* process, started once per test process, imports those modules once and forks a
worker on request; the child becomes the worker exactly as ``python -P -m workers ARGS`` would
(new session, working directory, environment, stdout and stderr to the log file, ``sys.argv``),
then runs ``workers/__main__.py`` as ``__main__``.

Only what the import cannot have fixed already is forked: a worker whose environment differs from
the zygote's in what the interpreter or the preloaded libraries read when they start (``PYTHON*``,
the thread counts, ``TRITON_INTERPRET``) is started with ``Popen`` as before (``can_fork``).
The zygote never runs a torch operation (no thread pool exists when it forks).

Run as a script: ``python -P tests/zygote.py SOCKET``; ``Zygote`` is the test process's side.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

#: read when the interpreter or a preloaded library starts: a worker that needs other values is not forked
FIXED_AT_START = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE",
                  "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET", "LD_LIBRARY_PATH", "LD_PRELOAD")

PRELOAD = ("torch", "numpy", "PIL.Image", "celery", "kombu", "redis", "billiard", "celery.bin.celery", "celery.bin.worker",
           "celery.apps.worker", "celery.worker.worker", "celery.concurrency.prefork", "celery.concurrency.asynpool",
           "celery.events", "celery.backends.redis", "kombu.transport.redis", "nasq.backends.torch_backend",
           "nasq.model.checkpoint", "nasq.model.cadene", "nasq.inference.shard", "nasq.data.sources", "workers.app",
           "workers.tasks", "workers.build_tasks", "nasq.results.report", "nasq.results.run")


# ------------------------------------------------------------------------------ the zygote process

def _become_worker(req: dict, closing: list) -> None:
    """In the forked child: become ``python -P -m workers *req['args']``; never returns."""
    code = 1
    try:
        for s in closing:
            s.close()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        os.setsid()
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
        try:
            runpy.run_module("workers", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what python -m would print
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    import matplotlib  # as nasq.results.report does when a merge draws its plots

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
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
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    line += chunk
                if not line.endswith(b"\n"):
                    conn.close()
                    continue
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _become_worker(req, [listener, wake_r, wake_w, conn, *children.values()])
                children[pid] = conn
                conn.sendall(f"pid {pid}\n".encode())
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
    ``poll``, ``wait``, ``returncode``, signals. Its exit status comes from the zygote."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str]):
        self._conn, self.pid, self.args, self.returncode = conn, pid, args, None
        self._buf = b""

    def _read(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        self._conn.settimeout(timeout)
        try:
            chunk = self._conn.recv(4096)
        except (socket.timeout, BlockingIOError):
            return
        if not chunk:  # the zygote is gone: judge by the process itself
            if not _alive(self.pid):
                self.returncode = -signal.SIGKILL
            elif timeout:
                time.sleep(min(timeout, 0.05))
            return
        self._buf += chunk
        if self._buf.endswith(b"\n"):
            self.returncode = int(self._buf.split()[1])
            self._conn.close()

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


class Zygote:
    def __init__(self, folder: str, env: dict):
        self.path = os.path.join(folder, "zygote.sock")
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, "-P", os.path.abspath(__file__), self.path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the zygote did not start (status {self.proc.wait()})")

    def can_fork(self, argv: list[str], env: dict) -> bool:
        """A ``python -P -m workers`` command whose environment agrees with the zygote's in what
        was fixed when it started."""
        return (self.proc.poll() is None and argv[:4] == [sys.executable, "-P", "-m", "workers"]
                and all(env.get(k) == self.env.get(k) for k in FIXED_AT_START))

    def spawn(self, argv: list[str], logpath: str, env: dict) -> ForkedProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        conn.sendall(json.dumps({"args": argv[4:], "env": env, "cwd": os.getcwd(),
                                 "log": os.path.abspath(logpath)}).encode() + b"\n")
        reply = b""
        while b"\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                raise RuntimeError("the zygote closed the connection before it forked")
            reply += chunk
        first, rest = reply.split(b"\n", 1)
        proc = ForkedProcess(conn, int(first.split()[1]), argv)
        proc._buf = rest  # the exit may have come with the pid
        if rest.endswith(b"\n"):
            proc.returncode = int(rest.split()[1])
            conn.close()
        return proc

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
