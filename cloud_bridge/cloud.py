"""The embedded cloud: a real Triton Inference Server on the demo cloud model, one bridge and the
model distributor (its store under the work dir).

This is what ``edgewire cloud`` runs on a laptop or in CI. Production runs the same bridge
against any Triton (``edgewire bridge --triton grpc://HOST:PORT``); the NGC container serves
the repository written beside this one (onnxruntime backend) unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from edgewire.config import BrokerSettings

from .admission import DEVICE_BURST, DEVICE_RATE_PER_S
from .bridge import Bridge
from .dispatch import Dispatcher
from .distributor import Distributor, FetchLimits
from .model_repository import write_onnxruntime_repository, write_python_repository
from .rules import RuleSet, default_rules
from .triton_server import EmbeddedTriton

log = logging.getLogger(__name__)


class EmbeddedCloud:
    def __init__(
        self,
        broker: BrokerSettings,
        models: list[Path],
        workdir: Path,
        *,
        rules: RuleSet | None = None,
        bridge_id: str = "bridge-1",
        distributor: bool = True,
        distributor_id: str | None = None,
        decode_workers: int = 0,
        device_rate_per_s: float = DEVICE_RATE_PER_S,
        device_burst: float = DEVICE_BURST,
        fetch_limits: FetchLimits | None = None,
    ) -> None:
        """``device_rate_per_s``, ``device_burst``: each device's budget of requests at the
        bridge; ``fetch_limits``: what fetches may make the distributor resend (see Bridge and
        Distributor): the same doors as the standalone services, set the same way."""
        self.broker = broker
        self.models = models
        self.workdir = workdir
        self.rules = rules
        self.bridge_id = bridge_id
        self.decode_workers = decode_workers
        self.device_rate_per_s = device_rate_per_s
        self.device_burst = device_burst
        self.fetch_limits = fetch_limits
        self.triton: EmbeddedTriton | None = None
        self.bridge: Bridge | None = None
        self.dispatcher: Dispatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._with_distributor = distributor
        self._distributor_id = distributor_id
        self.distributor: Distributor | None = None
        self._distributor_task: asyncio.Task[None] | None = None

    @property
    def repository(self) -> Path:
        return self.workdir / "triton-repository"

    @property
    def ngc_repository(self) -> Path:
        return self.workdir / "triton-repository-ngc"

    @property
    def model_store(self) -> Path:
        """Where the distributor keeps pushed artefacts."""
        return self.workdir / "model-store"

    async def __aenter__(self) -> EmbeddedCloud:
        names = write_python_repository(self.repository, self.models)
        write_onnxruntime_repository(self.ngc_repository, self.models)
        self.triton = EmbeddedTriton(self.repository, workdir=self.workdir)
        await self.triton.start()
        self.dispatcher = Dispatcher([f"grpc://{self.triton.grpc_url}"])
        rules = self.rules or default_rules(names[0])
        try:
            self.bridge = Bridge(
                self.bridge_id,
                self.broker,
                self.dispatcher,
                rules,
                decode_workers=self.decode_workers,
                device_rate_per_s=self.device_rate_per_s,
                device_burst=self.device_burst,
            )
        except ValueError:  # a budget no bucket can hold: stop what already runs
            await self.__aexit__(None, None, None)
            raise
        self._task = asyncio.create_task(self.bridge.run(), name="bridge")
        ready = asyncio.create_task(self.bridge.ready.wait())
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            await self.__aexit__(None, None, None)
            self._task.result()  # raises what stopped the bridge
        if self._with_distributor:
            await self._start_distributor()
        return self

    async def _start_distributor(self) -> None:
        try:
            self.distributor = Distributor(
                self.broker, self.model_store, client_id=self._distributor_id, fetch_limits=self.fetch_limits
            )
        except ValueError:  # limits no bucket can hold: stop what already runs
            await self.__aexit__(None, None, None)
            raise
        task = self._distributor_task = asyncio.create_task(self.distributor.run(), name="distributor")
        ready = asyncio.create_task(self.distributor.ready.wait())
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            await self.__aexit__(None, None, None)
            task.result()  # raises what stopped the distributor

    async def __aexit__(self, *exc_info: object) -> None:
        if self.distributor is not None and self._distributor_task is not None:
            self.distributor.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._distributor_task, 30)
        if self.bridge is not None and self._task is not None:
            self.bridge.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 30)
        if self.dispatcher is not None:
            await self.dispatcher.close()  # clients first, or the server's shutdown waits on them
        if self.triton is not None:
            await self.triton.stop()
