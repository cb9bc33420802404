"""Shared fixtures: real brokers (embedded amqtt, Mosquitto) and the demo artefacts."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from edgewire.demo.models import DemoArtifacts, build_demo

if TYPE_CHECKING:
    from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
#: CI sets EDGEWIRE_NO_SKIPS=1: then a test that would skip for something missing here
#: (Mosquitto, network namespaces, multicast, systemd-analyze, Triton, an OpenCV codec) fails
#: instead, naming what is missing, so a broken install cannot pass by running fewer tests.
#: On a developer's machine a skip stays a skip.
NO_SKIPS = os.environ.get("EDGEWIRE_NO_SKIPS") == "1"
#: CI runs the fault and end-to-end tests once more with EDGEWIRE_BURN_CPUS set to the number of
#: cores: that many processes spin for the whole session, so the tests must hold on a machine
#: with no core to spare (their deadlines have room; they assert correctness, not speed).
BURN_CPUS = int(os.environ.get("EDGEWIRE_BURN_CPUS", "0") or 0)


@pytest.fixture(scope="session", autouse=True)
def cpu_burners() -> Iterator[int]:
    import sys

    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL) for _ in range(BURN_CPUS)
    ]
    try:
        yield len(burners)
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A module that skips itself as a whole (``pytest.importorskip``) is caught here."""
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped:
        _fail_skip(report)


def _fail_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped with EDGEWIRE_NO_SKIPS=1 (set by CI), which allows no skip: {reason}"


# A private network namespace's loopback as a multicast link (for `unshare -n sh -c ...`).
NETNS_SETUP = "ip link set lo up; ip link set lo multicast on; ip route add 224.0.0.0/4 dev lo"


def netns_available() -> bool:
    """Whether `unshare -n` works here (root and iproute2); mDNS tests skip otherwise."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` (state in another task, process or file) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


@dataclass
class BrokerHandle:
    kind: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass(frozen=True)
class MosquittoFiles:
    """The files ``edgewire flash`` renders for a broker, put in place of the shipped paths."""

    password_file: Path
    acl_file: Path
    tls: str = ""  # extra lines for the listener (cafile, certfile, keyfile, ...)
    extra: str = ""  # extra lines for the whole broker (a plugin and its options)


class Mosquitto:
    """A Mosquitto process started from the shipped broker/mosquitto.conf on a free port.

    With ``files`` the shipped logins, ACL and client-id rule hold, with the given files; without,
    the tests that are not about identities get the same broker open to anonymous clients. With
    ``persist_in`` it saves its sessions and queues there (every 30 s, or every ``autosave_s``, and
    as it stops on SIGTERM; a SIGKILL loses what came since the last save), as a broker in the field
    does. ``hosts``: the addresses it listens on (one listener each, the same port)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        files: MosquittoFiles | None = None,
        persist_in: Path | None = None,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        log: Path | None = None,
        autosave_s: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.files = files
        self.persist_in = persist_in
        self.hosts = hosts
        self.log = log
        self.autosave_s = autosave_s
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def exe() -> str:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        return exe

    def write_config(self) -> Path:
        """The shipped configuration, rendered for this broker; its path."""
        shipped = (ROOT / "broker" / "mosquitto.conf").read_text()
        listeners = "\n".join(f"listener {self.port} {host}" for host in self.hosts)
        conf = re.sub(r"^listener .*$", listeners, shipped, flags=re.M)
        if self.files is None:
            conf = open_to_anonymous(conf)
        else:
            conf = re.sub(r"^password_file .*$", f"password_file {self.files.password_file}", conf, flags=re.M)
            conf = re.sub(r"^acl_file .*$", f"acl_file {self.files.acl_file}", conf, flags=re.M)
            if self.files.tls:
                conf = conf.replace(listeners, f"{listeners}\n{self.files.tls}", 1)
            conf += f"\n{self.files.extra}"
        if self.persist_in is not None:
            self.persist_in.mkdir(parents=True, exist_ok=True)
            on = f"persistence true\npersistence_location {self.persist_in}/"
            conf = re.sub(r"^persistence false$", on, conf, flags=re.M)
            assert on in conf, "the shipped conf no longer has 'persistence false'"
            if self.autosave_s is not None:
                conf = re.sub(r"^autosave_interval .*$", f"autosave_interval {self.autosave_s}", conf, flags=re.M)
                assert f"autosave_interval {self.autosave_s}" in conf, "autosave_interval is gone"
        # As root Mosquitto becomes `mosquitto`, who can neither read pytest's 0700 folders nor
        # write a persistence file there.
        if os.geteuid() == 0 and (self.files is not None or self.persist_in is not None):
            conf += "\nuser root\n"
        path = self.workdir / f"mosquitto-{self.port}.conf"
        path.write_text(conf)
        return path

    def start(self) -> None:
        cmd = [self.exe(), "-c", str(self.write_config())]
        if self.log is None:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_port(self.port, self.hosts[0], timeout=30)

    def kill(self) -> None:
        """SIGKILL: nothing saved on the way out, sockets closed by the kernel."""
        assert self.proc is not None and self.proc.poll() is None, "mosquitto already gone"
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 5)
        self.proc = None


def open_to_anonymous(conf: str) -> str:
    """The shipped Mosquitto config without its logins, ACL and client-id rule, for the tests
    that are not about identities (tests/test_identity.py runs it whole)."""
    conf = re.sub(r"^allow_anonymous false$", "allow_anonymous true", conf, flags=re.M)
    assert "allow_anonymous true" in conf, "the shipped conf no longer has 'allow_anonymous false'"
    return re.sub(r"^(password_file|acl_file|use_username_as_clientid) .*$", "", conf, flags=re.M)


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 10) -> None:
    """SIGTERM (a broker saves its state), then SIGKILL if it is still there after ``grace_s``."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def repository(demo: DemoArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton model repository serving the demo cloud model (python backend, onnxruntime)."""
    from edgewire.cloud_bridge.model_repository import write_python_repository

    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_python_repository(repo, [demo.cloud_model])
    return repo


@pytest_asyncio.fixture(loop_scope="function")
async def triton(repository: Path, tmp_path: Path) -> AsyncIterator[EmbeddedTriton]:
    """A real Triton Inference Server (from the nvidia-pytriton wheel) on that repository."""
    from edgewire.cloud_bridge.triton_server import EmbeddedTriton

    async with EmbeddedTriton(repository, workdir=tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoArtifacts:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The detect demo's detector trained on fewer scenes (seconds): the same graph, a weaker model."""
    from edgewire.demo import detector

    clf, reg = detector.train(scene_count=80)
    path = tmp_path_factory.mktemp("detector") / f"{detector.DETECTOR_NAME}.onnx"
    path.write_bytes(detector.to_onnx(clf, reg))
    return path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    m.start()
    yield m
    m.stop()


@pytest.fixture(params=["amqtt", "mosquitto"])
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BrokerHandle]:
    """Each test using this runs once against the embedded broker and once against Mosquitto."""
    if request.param == "amqtt":
        from edgewire.broker.embedded import EmbeddedBroker

        port = free_port()
        async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
            yield BrokerHandle("amqtt", "127.0.0.1", port)
    else:
        m = Mosquitto(tmp_path)
        await asyncio.to_thread(m.start)
        try:
            yield BrokerHandle("mosquitto", "127.0.0.1", m.port)
        finally:
            await asyncio.to_thread(m.stop)


#: The PaddleOCR PP-OCRv4 text detector as the rapidocr_onnxruntime wheel ships it: a real
#: foreign model (no edgewire metadata, open input size, probability-map output). The wheel is
#: fetched at set-up by `.ci/run` (pip download --no-deps: its opencv-python would clash with
#: opencv-python-headless), never at test time.
RAPIDOCR_WHEEL_GLOB = "rapidocr_onnxruntime-*.whl"
PADDLE_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"


@pytest.fixture(scope="session")
def paddle_text_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PP-OCRv4 det model unpacked from the wheel under .cache/wheels, or a skip naming the
    set-up step (a failure under EDGEWIRE_NO_SKIPS=1)."""
    import zipfile

    wheels = sorted((ROOT / ".cache" / "wheels").glob(RAPIDOCR_WHEEL_GLOB))
    if not wheels:
        pytest.skip(
            "the rapidocr_onnxruntime wheel is not under .cache/wheels; fetch it with "
            "`pip download -q --no-deps --dest .cache/wheels rapidocr_onnxruntime==1.4.4`"
        )
    target = tmp_path_factory.mktemp("paddle") / "ch_PP-OCRv4_det_infer.onnx"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        target.write_bytes(wheel.read(PADDLE_DET_MEMBER))
    return target
