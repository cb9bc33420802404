"""The one merge rule: a hard frame's final outcome from its first result and the cloud's answer.

Kept apart from the escalation lifecycle that applies it, so the rule can be read (and tested)
on its own: every path that ends an escalation -- an answer, a deadline, a restart -- ends it
through this function.
"""

from __future__ import annotations

import time
from typing import Any

from edgewire import envelopes as env
from edgewire.config import CloudSettings

from .tasks import TaskState


def final_outcome(
    cloud: CloudSettings,
    first: env.LocalResult,
    answer: env.Result | None,
    *,
    late: bool,
    hops: dict[str, float] | None = None,
) -> env.LocalResult | None:
    """The frame's final outcome from its first result and the cloud's answer (None: the
    deadline passed). The one merge rule: ``prefer_cloud`` takes the cloud's prediction,
    ``max_confidence`` the surer of the two. None when the answer adds nothing to a frame that
    was answered already (one queued while degraded). ``hops``: the trace's stamps so far; the
    outcome carries them with its own ``final`` stamp, the instant its latency is measured to."""
    unfinished = first.state == TaskState.PENDING_CLOUD.value
    update: dict[str, Any]
    if answer is not None and answer.status == "ok" and answer.prediction is not None:
        cloud_pred = answer.prediction
        update = {"degraded": False, "state": TaskState.COMPLETE.value}
        if (
            cloud.merge == "prefer_cloud"
            or first.prediction is None
            or cloud_pred.confidence >= first.prediction.confidence
        ):
            update |= {
                "prediction": cloud_pred,
                "answered_by": "cloud",
                "model": answer.model or first.model,
                "version": answer.version or first.version,
            }
    elif answer is not None and answer.status == "ok" and answer.detections is not None:
        # A detector's frame: the cloud's objects replace the device's (the bridge merged them
        # by its own policy: replace, relabel or union).
        update = {
            "degraded": False,
            "state": TaskState.COMPLETE.value,
            "detections": answer.detections,
            "answered_by": "cloud",
            "model": answer.model or first.model,
            "version": answer.version or first.version,
        }
    elif unfinished:
        # unavailable / rejected / expired, or no answer in time: the local answer stands, flagged.
        state = TaskState.COMPLETE if answer is not None else TaskState.TIMEOUT
        update = {"degraded": True, "state": state.value}
    else:
        return None
    now = time.time()
    update |= {"late": late, "latency_ms": (now - first.ts) * 1000.0}
    if hops is not None:
        update["hops"] = {**hops, "final": now}
    return first.model_copy(update=update)
