"""The per-device budgets an operator sets on the services every device shares: the bridge's
requests (``edgewire bridge``, ``edgewire cloud``), the distributor's resent chunks
(``edgewire distributor``, ``edgewire cloud``) and the embedded broker's reading of a device's
connection (``edgewire broker``).

One definition each, so the commands that run the same service take the same option, the same
environment variable and the same bounds. The bounds refuse what would shut every device out
(no burst, or a fetch burst smaller than the largest chunk, which no fetch could ever be paid
for) and what could never apply (a device's fetch budget above the distributor's overall one).
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from edgewire.broker.pacing import DEVICE_READ_BURST, DEVICE_READ_RATE
from edgewire.cloud_bridge.admission import DEVICE_BURST, DEVICE_RATE_PER_S, REFUSAL_BURST, REFUSALS_PER_S
from edgewire.cloud_bridge.resends import FetchLimits
from edgewire.delivery import MAX_CHUNK_SIZE
from edgewire.envelopes import MIB

_PAST_REQUESTS = (
    "A request past it is answered `rejected` (reason `rate limited`) without reaching Triton, and the device "
    f"sends it again later; past {REFUSAL_BURST:g} refusals at once ({REFUSALS_PER_S:g}/s) its requests are dropped "
    "unanswered."
)
_PAST_FETCHES = (
    "A fetch past it is served as far as the budget holds and the rest of its chunks are not sent (counted "
    "as rejected, reason fetch_rate_limited); the device asks again when its link goes quiet."
)


def _finite(value: float) -> float:
    """NaN passes every range check of some click releases, and no bucket can be paid from it."""
    if not math.isfinite(value):
        raise typer.BadParameter("must be a finite number")
    return value


DeviceRateOption = Annotated[
    float,
    typer.Option(
        "--device-rate",
        envvar="EDGEWIRE_BRIDGE_DEVICE_RATE",
        min=0.1,
        max=100_000.0,
        callback=_finite,
        help=f"each device's new requests per second at the bridge, after its burst. {_PAST_REQUESTS}",
    ),
]
DeviceBurstOption = Annotated[
    int,
    typer.Option(
        "--device-burst",
        envvar="EDGEWIRE_BRIDGE_DEVICE_BURST",
        min=1,
        max=1_000_000,
        help="requests one device may send at once before --device-rate paces it",
    ),
]
DeviceFetchRateOption = Annotated[
    float,
    typer.Option(
        "--device-fetch-rate",
        envvar="EDGEWIRE_DISTRIBUTOR_DEVICE_FETCH_RATE",
        min=0.01,
        max=FetchLimits.total_bytes_per_s / MIB,
        callback=_finite,
        help=f"MiB a second of chunks one device's fetches may make the distributor resend, after its burst "
        f"(at most the overall {FetchLimits.total_bytes_per_s / MIB:g} MiB/s). {_PAST_FETCHES}",
    ),
]
DeviceFetchBurstOption = Annotated[
    float,
    typer.Option(
        "--device-fetch-burst",
        envvar="EDGEWIRE_DISTRIBUTOR_DEVICE_FETCH_BURST",
        min=MAX_CHUNK_SIZE / MIB,
        max=FetchLimits.total_burst_bytes / MIB,
        callback=_finite,
        help=f"MiB of chunks one device may have resent at once: at least the largest chunk "
        f"({MAX_CHUNK_SIZE / MIB:g} MiB), at most the overall {FetchLimits.total_burst_bytes / MIB:g} MiB",
    ),
]

DeviceReadRateOption = Annotated[
    float,
    typer.Option(
        "--device-read-rate",
        envvar="EDGEWIRE_BROKER_DEVICE_READ_RATE",
        min=1.0,
        max=1_000_000.0,
        callback=_finite,
        help="MQTT packets a second the broker reads from each device login, after its burst; past it the "
        "device's connection is left unread (TCP slows the device, nothing is dropped). Logins only: an "
        "anonymous broker paces no one",
    ),
]
DeviceReadBurstOption = Annotated[
    int,
    typer.Option(
        "--device-read-burst",
        envvar="EDGEWIRE_BROKER_DEVICE_READ_BURST",
        min=1,
        max=10_000_000,
        help="packets one device may send at once before --device-read-rate paces it",
    ),
]

DEFAULT_DEVICE_READ_RATE = DEVICE_READ_RATE
DEFAULT_DEVICE_READ_BURST = DEVICE_READ_BURST
DEFAULT_DEVICE_RATE = DEVICE_RATE_PER_S
DEFAULT_DEVICE_BURST = int(DEVICE_BURST)
DEFAULT_DEVICE_FETCH_RATE = FetchLimits.device_bytes_per_s / MIB
DEFAULT_DEVICE_FETCH_BURST = FetchLimits.device_burst_bytes / MIB


def fetch_limits(device_rate_mib: float, device_burst_mib: float) -> FetchLimits:
    """The distributor's fetch budget with this per-device budget, in MiB (the overall one as shipped)."""
    return FetchLimits(device_bytes_per_s=device_rate_mib * MIB, device_burst_bytes=device_burst_mib * MIB)
