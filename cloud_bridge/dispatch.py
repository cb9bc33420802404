"""Calls into Triton: endpoints, per-(endpoint, model) circuit breakers, and the three strategies.

A call is only made while the request's deadline leaves time for it, and only to endpoints
whose breaker lets it through; when nothing can serve a request the caller gets Unavailable
with the reasons, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from edgewire.aio import spawn
from edgewire.envelopes import Prediction
from edgewire.errors import EdgewireError, ModelError
from edgewire.metrics import Meter
from edgewire.modelmeta import ModelMeta
from edgewire.scoring import predictions

from .breaker import BreakerBoard
from .model_repository import model_meta_from_config
from .rules import Route, aggregate

log = logging.getLogger(__name__)


class Unavailable(EdgewireError):
    """No endpoint could answer for this model in time."""


def failed_status(deadline: float) -> Literal["expired", "unavailable"]:
    """What a request the models could not answer is told: ``expired`` once its deadline has
    passed (the device stopped waiting and keeps its own answer), else ``unavailable`` (the
    cloud is down or busy now; the device may ask again later)."""
    return "expired" if time.time() >= deadline else "unavailable"


@dataclass(frozen=True)
class Answer:
    """One model's answer: a classifier's ``prediction``, or a detector's raw ``output`` for one
    image (its batch row, decoded by the caller, which knows the image's geometry)."""

    model: str
    version: str
    prediction: Prediction | None
    endpoint: str
    inference_ms: float
    output: np.ndarray | None = None


class Endpoint:
    """One Triton server, reached over gRPC (default) or HTTP with tritonclient's asyncio API."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "://" in url else f"grpc://{url}")
        if parts.scheme not in ("grpc", "http") or not parts.hostname:
            raise ValueError(f"Triton endpoint {url!r}: expected grpc://HOST:PORT or http://HOST:PORT")
        self.scheme = parts.scheme
        self.address = f"{parts.hostname}:{parts.port or (8001 if parts.scheme == 'grpc' else 8000)}"
        self.url = f"{self.scheme}://{self.address}"
        self._client: Any = None

    def _get(self) -> Any:
        if self._client is None:
            if self.scheme == "grpc":
                import tritonclient.grpc.aio as client_mod
            else:
                import tritonclient.http.aio as client_mod
            self._client = client_mod.InferenceServerClient(self.address)
        return self._client

    async def ready(self, model: str | None = None) -> bool:
        try:
            client = self._get()
            return bool(await (client.is_model_ready(model) if model else client.is_server_ready()))
        except Exception:
            return False

    async def model_config(self, model: str) -> Any:
        return await self._get().get_model_config(model)

    async def infer(self, model: str, meta: ModelMeta, tensor: np.ndarray, timeout_s: float) -> np.ndarray:
        if self.scheme == "grpc":
            from tritonclient.grpc import InferInput, InferRequestedOutput
        else:
            from tritonclient.http import InferInput, InferRequestedOutput
        inp = InferInput(meta.input.name, list(tensor.shape), "FP32")
        inp.set_data_from_numpy(tensor)
        out = [InferRequestedOutput(meta.output)]
        client = self._get()
        if self.scheme == "grpc":
            result = await client.infer(model, [inp], outputs=out, client_timeout=max(timeout_s, 0.001))
        else:
            result = await asyncio.wait_for(client.infer(model, [inp], outputs=out), max(timeout_s, 0.001))
        return result.as_numpy(meta.output)

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None


class _Queued(Exception):
    """The call's budget ran out in the bridge's own queue: the endpoint was never asked."""


class _Batcher:
    """Opportunistic batching of concurrent calls to one model on one endpoint.

    A call made while nothing is in flight goes out at once, alone (no added latency); calls
    that arrive while one is in flight wait and leave together as one batch, and a second call
    overlaps the first only when a full batch is waiting. Calls made in the same pass of the
    event loop always leave together. Under load this turns N gRPC calls into a few, which is
    most of what a call costs here, on the bridge and on Triton alike.

    Each caller gets its answer with the duration of the Triton call that carried it, not of
    its own wait: under a burst the queue grows while every call stays fast, and a circuit
    breaker judging the wait would open on a healthy endpoint and refuse every request for its
    open period. A caller whose budget runs out while it is still queued gets ``_Queued``.
    """

    def __init__(self, ep: Endpoint, model: str, meta: ModelMeta, max_batch: int, max_concurrent: int = 2) -> None:
        self.ep = ep
        self.model = model
        self.meta = meta
        self.max_batch = max_batch
        self.max_concurrent = max_concurrent
        self._queue: list[tuple[np.ndarray, asyncio.Future[tuple[Prediction | np.ndarray, float]], float]] = []
        self._running = 0
        self._kick_soon = False
        self._jobs: set[asyncio.Task[None]] = set()

    async def submit(self, tensor: np.ndarray, timeout_s: float) -> tuple[Prediction | np.ndarray, float]:
        """A classifier's prediction, or a detector's output row for this one image, and the
        milliseconds the Triton call that carried it took."""
        fut: asyncio.Future[tuple[Prediction | np.ndarray, float]] = asyncio.get_running_loop().create_future()
        self._queue.append((tensor, fut, time.monotonic() + timeout_s))
        if not self._kick_soon:
            # Kick at the end of this pass of the event loop, so that every request taken in
            # the same pass (one read from the broker often holds many) leaves in one batch.
            self._kick_soon = True
            asyncio.get_running_loop().call_soon(self._kick)
        return await fut

    def _kick(self) -> None:
        self._kick_soon = False
        # A second call overlaps the first only with a full batch to carry; otherwise what
        # arrives meanwhile waits for the call in flight and leaves with it as one batch
        # (singles going out beside a call in flight cost Triton and the bridge a call each).
        while self._queue and (
            self._running == 0 or (self._running < self.max_concurrent and len(self._queue) >= self.max_batch)
        ):
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            batch = [item for item in batch if not item[1].done()]  # hedged away while waiting
            if not batch:
                continue
            self._running += 1
            spawn(self._jobs, self._run(batch))

    async def _run(
        self, batch: list[tuple[np.ndarray, asyncio.Future[tuple[Prediction | np.ndarray, float]], float]]
    ) -> None:
        try:
            now = time.monotonic()
            for _, fut, deadline in batch:
                if deadline <= now and not fut.done():
                    fut.set_exception(_Queued(f"its {self.model} call waited its whole budget in the bridge's queue"))
            batch = [item for item in batch if not item[1].done()]
            if not batch:
                return
            tensor = batch[0][0] if len(batch) == 1 else np.concatenate([t for t, _, _ in batch])
            # The longest wait in the batch: one asker's tight deadline must not cut the call
            # short for the others batched with it (each asker judges its own answer's lateness).
            timeout = max(deadline for _, _, deadline in batch) - now
            t0 = time.perf_counter()
            probs = await self.ep.infer(self.model, self.meta, tensor, timeout)
            call_ms = (time.perf_counter() - t0) * 1000
        except Exception as exc:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            answers: list[Prediction] | np.ndarray
            if self.meta.task == "detect":
                answers = probs  # a row per image; boxes need each image's geometry to come back
            else:
                answers = predictions(probs, self.meta.labels)  # one pass for the whole batch
            for (_, fut, _), answer in zip(batch, answers, strict=True):
                if not fut.done():
                    fut.set_result((answer, call_ms))
        finally:
            self._running -= 1
            self._kick()


class Dispatcher:
    def __init__(
        self,
        urls: list[str],
        *,
        breakers: BreakerBoard | None = None,
        meter: Meter | None = None,
        call_timeout_s: float = 5.0,
        max_batch: int = 32,
    ) -> None:
        if not urls:
            raise ValueError("at least one Triton endpoint is needed")
        self.endpoints = [Endpoint(u) for u in urls]
        self.breakers = breakers or BreakerBoard()
        self.meter = meter or Meter("dispatcher")
        self.call_timeout_s = call_timeout_s
        self._metas: dict[str, ModelMeta] = {}
        self._rr = itertools.count()
        self.max_batch = max_batch
        self._batchers: dict[tuple[str, str], _Batcher] = {}

    async def close(self) -> None:
        for ep in self.endpoints:
            await ep.close()

    async def model_meta(self, model: str) -> ModelMeta:
        """The model's contract (labels, input), read once from Triton's model config."""
        meta = self._metas.get(model)
        if meta is not None:
            return meta
        problems = []
        for ep in self.endpoints:
            try:
                config = await asyncio.wait_for(ep.model_config(model), self.call_timeout_s)
            except Exception as exc:
                problems.append(f"{ep.url}: {_short(exc)}")
                continue
            meta = model_meta_from_config(config)
            self._metas[model] = meta
            return meta
        raise Unavailable(f"model {model!r}: no endpoint gave its config ({'; '.join(problems)})")

    async def call(self, model: str, tensor: np.ndarray, deadline: float, cap_s: float | None = None) -> Answer:
        """One inference of ``model`` on the first endpoint whose breaker admits it."""
        meta = await self.model_meta(model)
        n = len(self.endpoints)
        start = next(self._rr) % n
        reasons = []
        for k in range(n):
            ep = self.endpoints[(start + k) % n]
            breaker = self.breakers.get(ep.url, model)
            left = deadline - time.time()
            if left <= 0:
                reasons.append("deadline passed")
                break
            if not breaker.allow():
                reasons.append(f"{ep.url}: circuit open")
                continue
            limit = min(cap_s or self.call_timeout_s, self.call_timeout_s)
            budget = min(left, limit)
            t0 = time.perf_counter()
            try:
                answer, call_ms = await self._batcher(ep, model, meta).submit(tensor, budget)
            except asyncio.CancelledError:
                breaker.release()  # hedged away: neither a success nor a failure
                raise
            except _Queued as exc:  # the bridge was busy, not the endpoint: judge nothing
                breaker.release()
                self.meter.inc("triton_queue_timeouts_total", model=model)
                reasons.append(f"{ep.url}: {exc}")
                continue
            except Exception as exc:
                ms = (time.perf_counter() - t0) * 1000
                if left < limit and time.time() >= deadline:
                    # The asker's own deadline ran out, not the endpoint: a client that sends
                    # deadlines too tight to meet must not open the circuit for every device.
                    breaker.release()
                    self.meter.inc("triton_deadline_exceeded_total", model=model)
                    reasons.append(f"{ep.url}: the request's deadline passed during the call")
                    break
                breaker.record(False, ms)
                self.meter.inc("triton_errors_total", model=model)
                reasons.append(f"{ep.url}: {_short(exc)}")
                continue
            ms = (time.perf_counter() - t0) * 1000
            breaker.record(True, call_ms)  # the endpoint's time, not the wait in this bridge's queue
            self.meter.inc("triton_calls_total", model=model)
            if isinstance(answer, Prediction):
                return Answer(model, meta.version, answer, ep.url, ms)
            return Answer(model, meta.version, None, ep.url, ms, output=answer)
        raise Unavailable(f"{model}: " + ("; ".join(reasons) or "no endpoint"))

    async def health(self, models: set[str]) -> dict[tuple[str, str], bool]:
        """Readiness of every (endpoint, model), from Triton's own health API."""
        out: dict[tuple[str, str], bool] = {}
        for ep in self.endpoints:
            server = await ep.ready()
            for model in sorted(models):
                out[(ep.url, model)] = server and await ep.ready(model)
        return out

    def _batcher(self, ep: Endpoint, model: str, meta: ModelMeta) -> _Batcher:
        key = (ep.url, model)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = self._batchers[key] = _Batcher(ep, model, meta, self.max_batch)
        return batcher

    async def run(self, route: Route, tensors: dict[str, np.ndarray], deadline: float) -> Answer:
        """Serve one request by the route's strategy (see cloud_bridge.rules)."""
        cap = route.timeout_ms / 1000 if route.timeout_ms else None
        targets = list(route.route_to)
        if len(targets) == 1:  # every strategy means the same for one target; skip the machinery
            try:
                return await self.call(targets[0], tensors[targets[0]], deadline, cap)
            except ModelError as exc:
                raise Unavailable(str(exc)) from None
        if route.strategy == "fallback":
            reasons = []
            unsure: list[Answer] = []  # ok answers under the route's min_confidence
            for model in targets:
                try:
                    answer = await self.call(model, tensors[model], deadline, cap)
                except (Unavailable, ModelError) as exc:
                    reasons.append(str(exc))
                    continue
                if not route.unsure(answer.prediction):
                    return answer
                unsure.append(answer)
            if unsure:  # none was sure: the surest (the caller sees it is still under the bar)
                return max(unsure, key=lambda a: a.prediction.confidence if a.prediction else 0.0)
            raise Unavailable("; ".join(reasons))
        jobs = [asyncio.ensure_future(self.call(m, tensors[m], deadline, cap)) for m in targets]
        if route.strategy == "first_success":
            reasons = []
            try:
                for next_done in asyncio.as_completed(jobs):
                    try:
                        return await next_done
                    except (Unavailable, ModelError) as exc:
                        reasons.append(str(exc))
            finally:
                for job in jobs:
                    job.cancel()
            raise Unavailable("; ".join(reasons))
        # parallel: every target answers (or fails) within the deadline, answers are aggregated.
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        answers = [o for o in outcomes if isinstance(o, Answer)]
        if not answers:
            raise Unavailable("; ".join(str(o) for o in outcomes))
        voted = [a.prediction for a in answers if a.prediction is not None]
        if len(voted) < len(answers):
            return answers[0]  # detectors' outputs are not voted on: the first target's that answered
        best = aggregate(voted, route.aggregate)
        lead = next((a for a in answers if a.prediction is not None and a.prediction.label == best.label), answers[0])
        return Answer(
            "+".join(a.model for a in answers),
            "+".join(a.version for a in answers),
            best,
            lead.endpoint,
            max(a.inference_ms for a in answers),
        )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
