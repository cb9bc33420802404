"""A real Triton Inference Server, started from the pytriton wheel on a model repository.

The bridge talks to any Triton by URL; this is the one that runs without a container, for
development, tests and small single-host deployments. It runs the wheel's ``tritonserver``
binary directly on a repository written by :mod:`~edgewire.cloud_bridge.model_repository`
instead of going through PyTriton's bound callables: the same server answers in well under a
millisecond that way, against several through PyTriton's proxy.

The wheel's layout is not runnable as installed (the python backend's stub sits in a
per-interpreter folder), so the binaries are assembled once per pytriton and Python version
into a cache directory and reused by every later server.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.metadata
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from edgewire.errors import EdgewireError
from edgewire.ports import free_port

__all__ = ["EmbeddedTriton", "TritonError", "prepare_tritonserver"]

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
# Triton waits this long for in-flight requests on SIGTERM; kept under STOP_TIMEOUT_S so a
# client that never hangs up costs a slow stop, not a SIGKILL.
_EXIT_TIMEOUT_S = 10
_POLL_S = 0.05
_LOG_TAIL_LINES = 40
_INSTALL_HINT = "pip install 'edgewire[cloud]'"
_PR_SET_PDEATHSIG = 1


class TritonError(EdgewireError):
    """Triton could not be prepared, started or reached; the message carries the server log's tail."""


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgewire"


def _pytriton() -> tuple[str, Path, Path, Path]:
    """Version, dist dir, bundled libs dir and this interpreter's stub, from pytriton's own helpers."""
    try:
        version = importlib.metadata.version("nvidia-pytriton")
        from pytriton.triton import TRITONSERVER_DIST_DIR
        from pytriton.utils.distribution import get_libs_path, get_stub_path
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise TritonError(f"the embedded Triton needs the nvidia-pytriton wheel: {_INSTALL_HINT} ({exc})") from exc
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    return version, Path(TRITONSERVER_DIST_DIR), Path(get_libs_path()), Path(get_stub_path(pyver))


def prepare_tritonserver(cache_dir: Path | None = None) -> Path:
    """A runnable copy of the wheel's server for this interpreter; built once, then reused.

    Built in a sibling temp dir and renamed into place, so concurrent first runs (parallel
    test workers) never see a half-copied server: the loser of the rename discards its copy.
    """
    version, dist, _, stub = _pytriton()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = Path(cache_dir) if cache_dir else _default_cache_root() / f"tritonserver-{version}-py{pyver}"
    if (target / "bin" / "tritonserver").is_file():
        return target
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton {version} has no python backend stub for Python {pyver} ({stub})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build = tmp / "tritonserver"
        shutil.copytree(dist, build, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, build / "backends" / "python" / "triton_python_backend_stub")
        try:
            os.rename(build, target)
        except OSError:
            if not (target / "bin" / "tritonserver").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the server when its parent dies.

    If the bridge is SIGKILLed, atexit never runs, and a server in its own session would
    otherwise hold the ports forever. libc is resolved here, before the fork, so the child
    only makes the one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return hook


# Strong references: a server whose EmbeddedTriton was dropped without stop() is exactly the
# one atexit must still find.
_LIVE: set[EmbeddedTriton] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server._kill_now()  # noqa: SLF001 - this module's own last-resort cleanup


async def _http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status code of one GET, or None when nothing answers; no HTTP client dependency needed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class EmbeddedTriton:
    """A ``tritonserver`` subprocess bound to one host, for as long as the ``async with`` lasts.

    Ports are fixed at construction, so ``stop()`` then ``start()`` brings the server back
    where clients expect it. The process runs in its own session (a Ctrl-C aimed at the test
    runner must not kill it mid-request) and is still tied to this process three ways:
    ``stop()`` on exit from the context, an atexit hook, and a parent-death signal. The
    parent-death signal follows the *thread* that started the server, so start it from the
    thread that runs the event loop, as :meth:`start` does.
    """

    def __init__(
        self,
        repository: Path,
        *,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        workdir: Path | None = None,
        log_path: Path | None = None,
        cache_dir: Path | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.repository = Path(repository)
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        while self.http_port == self.grpc_port:
            self.http_port = free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgewire-triton-"))
        self.log_path = Path(log_path) if log_path else self.workdir / "tritonserver.log"
        self.cache_dir = cache_dir
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._models: list[str] = []
        #: Seconds the last start() took until every model was ready.
        self.start_seconds: float | None = None

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._exited()

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group's (it runs in its own
        session with its python-backend stubs): a fault test kills the group to crash it."""
        return self._proc.pid if self._proc is not None else None

    @property
    def models(self) -> list[str]:
        """The models start() waited for: every directory in the repository with a config.pbtxt."""
        return list(self._models)

    def _exited(self) -> bool:
        # WNOWAIT leaves the zombie unreaped, so the process group id cannot be reused
        # before _reap() has killed the python stubs that may still be in the group.
        assert self._proc is not None
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        _LIVE.discard(self)

    def _kill_now(self) -> None:
        """Synchronous last resort for interpreter exit: no loop to await on there."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while not self._exited() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        self._reap()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, why: str) -> TritonError:
        return TritonError(f"{why}\n--- tail of {self.log_path} ---\n{self.log_tail()}")

    def _command(self, server: Path) -> list[str]:
        # A unique shm prefix keeps two servers on one host (parallel test workers) from
        # attaching to each other's python-backend shared memory.
        shm_prefix = f"edgewire{os.getpid()}-{secrets.token_hex(4)}-"
        return [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            "--allow-metrics=false",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--exit-timeout-secs={_EXIT_TIMEOUT_S}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--log-verbose=0",
        ]

    def _environment(self, server: Path) -> dict[str, str]:
        _, _, libs, _ = _pytriton()
        env = dict(os.environ)
        # The server links the wheel's bundled libs and, through the python backend stub,
        # this interpreter's libpython (not on the default path for pyenv/uv builds).
        lib_dirs = [str(libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in lib_dirs if d)
        # The stub's embedded interpreter finds its prefix (and so this venv's numpy and
        # onnxruntime) by looking up `python3` on PATH; sys.executable is deliberately not resolved.
        bin_dirs = [str(Path(sys.executable).parent), env.get("PATH", "")]
        env["PATH"] = os.pathsep.join(d for d in bin_dirs if d)
        return env

    def _scan_models(self) -> list[str]:
        if not self.repository.is_dir():
            raise TritonError(f"model repository {self.repository} does not exist")
        models = sorted(p.name for p in self.repository.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())
        if not models:
            raise TritonError(f"model repository {self.repository} holds no model (no <name>/config.pbtxt)")
        return models

    async def start(self) -> None:
        """Start the server and return once it and every model in the repository are ready."""
        if self.running:
            return
        if self._proc is not None:  # died on its own since the last start
            self._reap()
        self._models = self._scan_models()
        server = await asyncio.to_thread(prepare_tritonserver, self.cache_dir)
        env = self._environment(server)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== edgewire: starting tritonserver {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            log.flush()
            # Popen on the loop's thread, not asyncio's subprocess API: its child watcher would
            # reap the server behind _exited()'s back, and the death signal binds to this thread.
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                self._command(server),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_pdeathsig_hook(),
            )
        _LIVE.add(self)
        try:
            await self._wait_ready(began + self.start_timeout)
        except BaseException:
            self._kill_now()
            raise
        self.start_seconds = time.monotonic() - began

    async def _wait_ready(self, deadline: float) -> None:
        pending = ["/v2/health/ready", *(f"/v2/models/{quote(m, safe='')}/ready" for m in self._models)]
        host = _connect_host(self.host)
        while pending:
            if self._exited():
                proc = self._proc
                self._reap()
                code = proc.returncode if proc is not None else "?"
                raise self._fail(f"tritonserver exited during startup (status {code})")
            if time.monotonic() > deadline:
                raise self._fail(f"tritonserver not ready after {self.start_timeout:.0f} s; still waiting on {pending}")
            if await _http_status(host, self.http_port, pending[0]) == 200:
                pending.pop(0)
                continue
            await asyncio.sleep(_POLL_S)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; close gRPC clients first or Triton waits on them."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        # A child's exit is not an awaitable event without asyncio's child watcher (see start()).
        while not self._exited() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)
        self._reap()

    async def __aenter__(self) -> EmbeddedTriton:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
