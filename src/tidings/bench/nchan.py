"""The Nchan peer for --compare: nginx with the nchan module, on a free port, fresh per run.

The configuration (nchan.conf beside this file, shipped as package data) is the
performance lab's: one worker, EventSource subscribers, HTTP publishing. nginx
runs in the foreground (``daemon off``) under taskset when pinning, with its
prefix, logs and pid file in a temporary directory, and is stopped with SIGTERM
(fast shutdown), then SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from .procstat import ProcTree
from .report import BenchError, Progress
from .target import Target, free_port, taskset, wait_http

__all__ = ["NCHAN_MODULE", "NGINX", "available", "nchan_server"]

NGINX = "/usr/sbin/nginx"
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
STOP_TIMEOUT = 10.0


def available(nginx: str = NGINX, module: str = NCHAN_MODULE) -> str | None:
    """None when nginx and the nchan module are installed, else what is missing."""
    if not (os.access(nginx, os.X_OK) or shutil.which(nginx)):
        return f"{nginx} is not installed (apt-get install nginx-light)"
    if not Path(module).is_file():
        return f"{module} is not installed (apt-get install libnginx-mod-nchan)"
    return None


def render(port: int, module: str) -> str:
    """nchan.conf for `port`, sized to this process's open-file cap."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = 20_000 if hard == resource.RLIM_INFINITY else hard
    text = resources.files(__package__).joinpath("nchan.conf").read_text()
    for name, value in {
        "@MODULE@": module,
        "@NOFILE@": str(nofile),
        "@CONNECTIONS@": str(max(1024, nofile - 100)),
        "@PORT@": str(port),
    }.items():
        text = text.replace(name, value)
    return text


@contextlib.contextmanager
def nchan_server(
    progress: Progress,
    *,
    cpus: str | None = None,
    nginx: str = NGINX,
    module: str = NCHAN_MODULE,
) -> Iterator[Target]:
    missing = available(nginx, module)
    if missing:
        raise BenchError(f"--compare needs Nchan: {missing}")
    with tempfile.TemporaryDirectory(prefix="tidings-nchan-") as tmp:
        prefix = Path(tmp)
        for sub in ("run", "logs", "tmp"):
            (prefix / sub).mkdir()
        for path in (prefix, prefix / "tmp"):
            path.chmod(0o755)  # nginx's worker may run as another user
        port = free_port()
        (prefix / "nginx.conf").write_text(render(port, module))
        log = prefix / "logs" / "error.log"
        progress.show(f"starting nchan on 127.0.0.1:{port}", force=True)
        argv = [*taskset(cpus), nginx, "-p", f"{prefix}/", "-c", "nginx.conf", "-e", str(log)]
        stderr = prefix / "logs" / "stderr.log"
        with stderr.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            wait_http("127.0.0.1", port, "/healthz", proc, stderr)
            yield Target("nchan", "127.0.0.1", (port,), port, pids=(proc.pid,))
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: nginx's fast shutdown (the master stops its worker); SIGKILL both if stuck."""
    if proc.poll() is not None:
        return
    family = ProcTree((proc.pid,)).pids()
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        for pid in family:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
