"""Routing rules: which Triton models answer which escalations, and how.

An operator writes them as YAML (see :func:`load_rules`)::

    rules:
      - name: hard-digits
        when:                       # every condition given must hold; none given = always
          model_hint: "digits*"     # glob on Request.model_hint; a request without a hint never matches
          local_confidence_below: 0.5
          local_label: ["3", "5", "8"]
          devices: ["cam-*"]        # globs on device_id
          fleets: ["lab"]           # globs on the request's fleet; a request without one never matches
          task: detect              # classify or detect (Request.task)
          classes: ["3", "8"]       # a detection (or the local answer) has one of these labels
        route_to: [digits-cloud, digits-cloud-b]
        merge: relabel              # detect requests: replace, relabel or union (see below)
        strategy: parallel
        aggregate: vote
        timeout_ms: 800
    default:                        # optional: used when no rule matches
      route_to: [digits-cloud]

Rules are tried in order and the first whose conditions all hold decides; else the default
does; else there is no route and the bridge answers ``rejected``. A file that could never
behave as written (unknown key, empty or repeated targets, two rules of one name, a rule
hidden behind a catch-all) is refused at start, naming the file and line, rather than
misrouting traffic later.

Strategies, for a route with several targets:

- ``first_success`` (the default): send to every target at once; the first ok answer wins and
  the others are cancelled. Hedging trades extra load for a tail latency set by the fastest
  healthy target instead of the slowest.
- ``fallback``: one target at a time, in order; the next only when the previous failed. Costs
  nothing extra while the first target is healthy, at the price of latency when it is not.
- ``parallel``: every target, all awaited within the deadline, and the answers that came back
  are combined by ``aggregate``: ``vote`` (most common label, ties to the larger summed
  confidence) or ``max_confidence`` (the single most confident answer, the default).

``timeout_ms`` caps each dispatch of the route; the request's own deadline still applies.

Tiers: a bridge at a site (an edge server between the site's devices and the cloud) names the
cloud as the last target of a ``fallback`` route, ``tier:cloud``, and says where such a request
is handed up in ``upstream``::

    upstream:
      prefix: cloud/            # the site broker's uplink carries cloud/req/# up as req/#
      max_local_queue: 64       # more requests than this at the site at once: busy, hand up
    default:
      route_to: [digits-site, "tier:cloud"]
      strategy: fallback
      min_confidence: 0.8       # a site answer less sure than this is unsure: hand up

A request goes up when the site's model is unsure (an ``ok`` classify answer under
``min_confidence``), busy (the device's rate budget spent, ``max_local_queue`` reached, or the
breaker open) or down (Triton unreachable): see cloud_bridge.upstream. ``min_confidence`` also
works between models of one tier: a ``fallback`` route asks its next model when an answer is
unsure, and keeps the surest answer when none is sure.

Merge policies, for ``detect`` requests (see cloud_bridge.detect_merge):

- ``relabel`` (the default for a route to classifiers): the route's classifier labels each crop
  the device sent (or each detection's box cut from the frame), and that label and its
  confidence replace the device's for that box.
- ``replace`` (the default for a route to detectors): the route's detector runs on the whole
  frame and its detections are the answer.
- ``union``: the detector's and the device's detections together, class-aware NMS over both.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from edgewire.config import StrictModel, load_yaml_model
from edgewire.envelopes import Prediction, Request

Strategy = Literal["first_success", "parallel", "fallback"]
Aggregate = Literal["vote", "max_confidence"]
Merge = Literal["replace", "relabel", "union"]

#: Model names are folders in a Triton repository and labels in metrics: keep them to safe characters.
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RULE_NAME = _MODEL
#: The route target that hands a request up to the cloud tier (not a model: a colon is not
#: allowed in model names). Only as the last target of a route.
TIER_CLOUD = "tier:cloud"
#: Key under which load_rules threads sibling knowledge through validation (see Rule._siblings).
_SCOPE = "edgewire.rules.scope"


def _as_list(value: Any) -> Any:
    """YAML users write ``devices: cam-01`` for one item; a bare scalar means a list of one."""
    return [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value


class Route(StrictModel):
    """Where a request goes and how its targets are used."""

    route_to: list[str]
    strategy: Strategy = "first_success"
    # validate_default: parallel fills in max_confidence, so dispatch never sees None for it.
    aggregate: Aggregate | None = Field(None, validate_default=True)
    timeout_ms: float | None = Field(None, gt=0)
    #: How a detect request's answer is formed; None: relabel for classifiers, replace for detectors.
    merge: Merge | None = None
    #: A fallback route's bar for an answer: an ok classify answer below it is unsure, and the
    #: next target (another model, or ``tier:cloud``) is asked.
    min_confidence: float | None = Field(None, ge=0, le=1)
    #: The rule this route came from ("default" for the default route), for logs and metrics.
    name: str = "default"

    @field_validator("route_to", mode="before")
    @classmethod
    def _one_target(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("route_to")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("is empty; name at least one Triton model")
        if TIER_CLOUD in v[:-1]:
            raise ValueError(f"{TIER_CLOUD!r} hands a request up, so it can only be the last target")
        bad = [m for m in v if not _MODEL.match(m) and m != TIER_CLOUD]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: a model name is 1-128 of A-Z a-z 0-9 . _ -")
        dupes = sorted({m for m in v if v.count(m) > 1})
        if dupes:
            raise ValueError(f"lists {', '.join(dupes)} more than once; name each model once")
        return v

    @field_validator("aggregate")
    @classmethod
    def _aggregate_only_for_parallel(cls, v: Aggregate | None, info: ValidationInfo) -> Aggregate | None:
        strategy = info.data.get("strategy")
        if strategy is None:  # strategy itself was invalid; that error is reported on its own
            return v
        if strategy != "parallel":
            if v is not None:
                raise ValueError(
                    f"'aggregate' combines answers of strategy 'parallel' only, and this route is '{strategy}'; "
                    "remove 'aggregate' or set 'strategy: parallel'"
                )
            return None
        return v or "max_confidence"

    @model_validator(mode="after")
    def _tiers_fall_back(self) -> Route:
        several = len(self.route_to) > 1
        if several and self.strategy != "fallback" and (TIER_CLOUD in self.route_to or self.min_confidence is not None):
            what = f"{TIER_CLOUD!r}" if TIER_CLOUD in self.route_to else "'min_confidence'"
            raise ValueError(
                f"{what} needs one target after another, and this route is '{self.strategy}'; set 'strategy: fallback'"
            )
        if self.min_confidence is not None and not several:
            raise ValueError("'min_confidence' decides when to ask the next target, and this route has one; add one")
        return self

    @property
    def hands_up(self) -> bool:
        """Whether this route may hand a request up to the cloud tier."""
        return self.route_to[-1] == TIER_CLOUD

    def unsure(self, prediction: Prediction | None) -> bool:
        """Whether a classify answer is under this route's bar (a detect answer has no bar here)."""
        return (
            self.min_confidence is not None and prediction is not None and prediction.confidence < self.min_confidence
        )

    def at_this_tier(self) -> Route | None:
        """The same route without ``tier:cloud``: what this tier's Triton serves (None: nothing)."""
        if not self.hands_up:
            return self
        models = self.route_to[:-1]
        return self.model_copy(update={"route_to": models}) if models else None


class When(StrictModel):
    """Conditions on a request; each one given must hold, and a missing field never satisfies one."""

    model_hint: str | None = None
    local_confidence_below: float | None = Field(None, ge=0, le=1)
    local_label: list[str] | None = None
    devices: list[str] | None = None
    fleets: list[str] | None = None
    task: Literal["classify", "detect"] | None = None
    classes: list[str] | None = None

    @field_validator("local_label", "devices", "fleets", "classes", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        v = _as_list(v)
        # Digit labels written unquoted ([3, 5, 8]) arrive as ints; labels on the wire are strings.
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("local_label", "devices", "fleets", "classes")
    @classmethod
    def _not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty list matches nothing; list at least one value, or remove the key to match any")
        return v

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in type(self).model_fields)

    def matches(self, request: Request) -> bool:
        if self.model_hint is not None and (
            request.model_hint is None or not fnmatch.fnmatchcase(request.model_hint, self.model_hint)
        ):
            return False
        local = request.local
        if self.local_confidence_below is not None and (
            local is None or not local.confidence < self.local_confidence_below
        ):
            return False
        if self.local_label is not None and (local is None or local.label not in self.local_label):
            return False
        if self.devices is not None and not _glob_any(request.device_id, self.devices):
            return False
        if self.task is not None and request.task != self.task:
            return False
        if self.classes is not None and not _has_class(request, self.classes):
            return False
        # getattr: older Request envelopes carry no fleet.
        fleet = getattr(request, "fleet", None)
        return self.fleets is None or (fleet is not None and _glob_any(fleet, self.fleets))


def _has_class(request: Request, classes: list[str]) -> bool:
    """A detection of the request (or, for a classification, its local answer) carries one of
    ``classes``."""
    if any(d.label in classes for d in request.detections):
        return True
    return request.local is not None and request.local.label in classes


def _glob_any(value: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, g) for g in globs)


class Rule(Route):
    name: str
    when: When = Field(default_factory=When)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _RULE_NAME.match(v):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 . _ - and start with a letter or digit")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _siblings(cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Rule:
        # A rule cannot see its siblings, and RuleSet's own check can only blame the whole file
        # (line 1). When load_rules passes a scope, each rule checks itself against the rules
        # before it, so the error lands on the offending rule's line.
        scope = (info.context or {}).get(_SCOPE)
        if scope is None:
            return handler(data)
        try:
            rule = handler(data)
        except ValidationError:
            # Still claim the name, so that a later rule repeating it is reported in the same run.
            name = data.get("name") if isinstance(data, dict) else None
            if isinstance(name, str):
                scope["names"].add(name)
            raise
        problem = _conflict(scope["names"], scope["catch_all"], rule)
        scope["names"].add(rule.name)
        if scope["catch_all"] is None and rule.when.is_empty():
            scope["catch_all"] = rule.name
        if problem:
            raise ValueError(problem)
        return rule


def _conflict(names: set[str], catch_all: str | None, rule: Rule) -> str | None:
    if rule.name in names:
        return f"a rule before this one is already named {rule.name!r}; give each rule its own name"
    if catch_all is not None:
        return (
            f"rule {catch_all!r} before this one has no conditions and takes every request, so rule "
            f"{rule.name!r} never applies; move {catch_all!r} last or make it the 'default'"
        )
    return None


class UpstreamSettings(StrictModel):
    """Where a site's bridge hands requests up (routes ending in ``tier:cloud``)."""

    #: Prefix of the topics the site broker's uplink carries: a request is republished on
    #: ``<prefix>req/<device>/<trace>`` (the uplink strips the prefix at the central broker) and
    #: the cloud's answer comes down on ``<prefix>result/<device>``.
    prefix: str = Field("cloud/", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}/$")
    #: Requests being served at the site at once past which the site is busy and hands up.
    max_local_queue: int = Field(64, ge=1)
    #: How long a handed-up request waits for the cloud's answer before it is answered
    #: ``unavailable`` (the device asks again later): an uplink cut lasts this long at most.
    hold_s: float = Field(600.0, gt=0)


class RuleSet(StrictModel):
    rules: list[Rule] = Field(default_factory=list)
    default: Route | None = None
    upstream: UpstreamSettings | None = None

    @field_validator("default")
    @classmethod
    def _default_reachable(cls, v: Route | None, info: ValidationInfo) -> Route | None:
        scope = (info.context or {}).get(_SCOPE)
        if v is not None and scope is not None and scope["catch_all"] is not None:
            raise ValueError(_unused_default(scope["catch_all"]))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        # Repeats the per-rule checks for rule sets built in code, where no scope is passed.
        names: set[str] = set()
        catch_all: str | None = None
        for rule in self.rules:
            problem = _conflict(names, catch_all, rule)
            if problem:
                raise ValueError(problem)
            names.add(rule.name)
            if catch_all is None and rule.when.is_empty():
                catch_all = rule.name
        if catch_all is not None and self.default is not None:
            raise ValueError(_unused_default(catch_all))
        if not self.rules and self.default is None:
            raise ValueError("no rules and no default, so every request would be rejected; add a rule or a 'default'")
        if self.upstream is None and any(r.hands_up for r in self._routes()):
            raise ValueError(
                f"a route hands requests up ({TIER_CLOUD!r}) and there is no 'upstream'; "
                "add 'upstream: {prefix: cloud/}'"
            )
        return self

    def _routes(self) -> list[Route]:
        return [*self.rules, *([self.default] if self.default is not None else [])]

    def route(self, request: Request) -> Route | None:
        """The first matching rule's route, else the default, else None (no route)."""
        for rule in self.rules:
            if rule.when.matches(request):
                return rule
        return self.default

    def models(self) -> set[str]:
        """Every model some route may call, so the bridge can check them all at start."""
        return {m for r in self._routes() for m in r.route_to if m != TIER_CLOUD}


def _unused_default(catch_all: str) -> str:
    return f"rule {catch_all!r} has no conditions and takes every request, so 'default' never applies; remove one"


def load_rules(path: str | Path) -> RuleSet:
    """A rule file, validated at start: a wrong one is refused with its file, line and the fix."""
    return load_yaml_model(path, RuleSet, context={_SCOPE: {"names": set(), "catch_all": None}})


def default_rules(model: str) -> RuleSet:
    """The rule set of a bridge started without a rule file: every request to one model."""
    return RuleSet(default=Route(route_to=[model]))


def aggregate(predictions: list[Prediction], how: str | None = "max_confidence") -> Prediction:
    """Combine the answers of a ``parallel`` route into one.

    ``vote`` lets agreement beat a single overconfident model: the most common label wins,
    ties go to the larger summed confidence, then to the label answered first. Its confidence
    is the mean of the winning voters' (a vote is only as sure as its voters on average), and
    its class index and margin are those of the most confident voter. ``max_confidence``
    (also what None means) returns the single most confident answer, the first on ties.
    """
    if not predictions:
        raise ValueError("no predictions to aggregate")
    if how is None or how == "max_confidence":
        return max(predictions, key=lambda p: p.confidence)
    if how != "vote":
        raise ValueError(f"unknown aggregation {how!r}; use 'vote' or 'max_confidence'")
    votes = Counter(p.label for p in predictions)
    weight = {label: sum(p.confidence for p in predictions if p.label == label) for label in votes}
    label = max(votes, key=lambda lb: (votes[lb], weight[lb]))  # Counter keeps first-seen order
    voters = [p for p in predictions if p.label == label]
    lead = max(voters, key=lambda p: p.confidence)
    return Prediction(
        label=label,
        class_index=lead.class_index,
        confidence=weight[label] / len(voters),
        margin=lead.margin,
    )
