"""Flower for a nasq deployment: ``nasq flower`` (``launch``) starts it on the broker with
authentication, and Flower runs this module's Celery app (``celery -A nasq.queue.flower``): the
same broker and JSON-only settings as every nasq process."""
from __future__ import annotations

import os
import sys

from ..config import load_settings, redact
from ..errors import NasqError


def __getattr__(name: str):
    """``app``: made when Flower asks for it, so that importing ``launch`` builds no Celery app."""
    if name == "app":
        from .app import make_app

        globals()["app"] = made = make_app(load_settings())
        return made
    raise AttributeError(name)


def read_auth_file(path: str | None) -> str | None:
    """user:password pairs from a file (one per line, # comments), joined as Flower takes them."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            pairs = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise NasqError(f"--basic-auth-file {path}: {e.strerror}") from None
    if not pairs:
        raise NasqError(f"--basic-auth-file {path} holds no user:password line")
    return ",".join(pairs)


def launch(settings, *, address: str, port: int, auth: str | None, open_: bool, max_tasks: int, log=print):
    """Replace this process with Flower on ``settings``' broker. The credentials reach Flower
    through its environment, never its command line (``/proc/PID/cmdline`` is readable by every
    local user); without them Flower starts only when ``open_`` says so.

    Raises:
        NasqError: no broker, no credentials (and not ``open_``), malformed credentials.
    """
    from .broker import probe

    if not settings.broker_url:
        raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL")
    if not auth and not open_:
        raise NasqError("Flower lets anyone who reaches it revoke tasks and shut workers down, so nasq starts it with "
                        "authentication: pass --basic-auth user:password (or set NASQ_FLOWER_BASIC_AUTH); "
                        "--no-auth starts it open, on purpose")
    if auth and not all(":" in pair for pair in auth.split(",")):
        raise NasqError("--basic-auth takes user:password (several: user1:pw1,user2:pw2)")
    import importlib.util

    try:
        found = importlib.util.find_spec("flower") is not None
    except ImportError:
        found = False
    if not found:
        raise NasqError("Flower is not installed in this environment: pip install 'nasq[flower]'")
    probe(settings)
    _enable_task_events(settings, log)
    env = dict(os.environ, NASQ_BROKER_URL=settings.broker_url)
    if settings.result_backend:
        env["NASQ_RESULT_BACKEND"] = settings.result_backend
    cmd = [sys.executable, "-P", "-m", "celery", "-A", __name__, "flower", f"--address={address}", f"--port={port}",
           f"--max_tasks={max_tasks}"]
    env.pop("FLOWER_BASIC_AUTH", None)
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth  # Flower reads FLOWER_* options from its environment: not on argv
    else:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # --no-auth: the REST API is open too, as asked
    log(f"Flower on http://{address}:{port} for {redact(settings.broker_url)} "
        f"({'basic auth' if auth else 'NO AUTHENTICATION'})")
    os.chdir("/")  # Celery puts the current folder first on sys.path for -A: a `nasq/` there must not shadow nasq
    os.execve(sys.executable, cmd, env)


def _enable_task_events(settings, log) -> None:
    """Ask every worker up now to send task events (they send none by default, see the
    ``task_events`` setting): Flower asks too, but only 5 s after it starts, and a run sent
    meanwhile would miss from its task list."""
    from .app import make_app

    app = make_app(settings)
    try:
        app.control.enable_events()
    except Exception as e:  # noqa: BLE001 - Flower asks again itself
        log(f"could not ask the workers for task events now ({type(e).__name__}: {e}); Flower will")
    finally:
        app.close()
