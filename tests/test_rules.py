"""Routing rules: matching, the file checks that refuse a wrong rule file at start, and aggregation."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from edgewire.cloud_bridge.rules import Route, Rule, RuleSet, When, aggregate, default_rules, load_rules
from edgewire.envelopes import Detection, Prediction, Request
from edgewire.errors import ConfigError

EXAMPLE = """\
rules:
  - name: hard-digits
    when:
      model_hint: "digits*"
      local_confidence_below: 0.5
      local_label: ["3", "5", "8"]
      devices: ["cam-*"]
      fleets: ["lab"]
    route_to: [digits-cloud, digits-cloud-b]
    strategy: parallel
    aggregate: vote
    timeout_ms: 800
  - name: lab-any
    when: {fleets: [lab]}
    route_to: [digits-cloud-b, digits-cloud]
    strategy: fallback
default:
  route_to: [digits-cloud]
  strategy: first_success
"""


def pred(label: str, confidence: float, margin: float = 0.1, class_index: int | None = None) -> Prediction:
    index = int(label) if class_index is None and label.isdigit() else (class_index or 0)
    return Prediction(label=label, class_index=index, confidence=confidence, margin=margin)


def request(
    device_id: str = "cam-01",
    *,
    fleet: str | None = "lab",
    model_hint: str | None = "digits",
    local: Prediction | None = None,
) -> Request:
    return Request(
        trace_id="t-1",
        device_id=device_id,
        fleet=fleet,
        created=1.0,
        deadline=2.0,
        model_hint=model_hint,
        local=local,
        payload=b"jpeg",
        content_type="image/jpeg",
        reply_to=f"result/{device_id}",
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refused(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    return path, str(info.value)


# ---- loading and routing ------------------------------------------------------------------


def test_example_file_loads(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, EXAMPLE))
    first = rules.rules[0]
    assert first.name == "hard-digits"
    assert first.route_to == ["digits-cloud", "digits-cloud-b"]
    assert (first.strategy, first.aggregate, first.timeout_ms) == ("parallel", "vote", 800)
    assert first.when.local_label == ["3", "5", "8"]
    assert rules.default is not None and rules.default.name == "default"
    assert rules.default.aggregate is None
    assert rules.models() == {"digits-cloud", "digits-cloud-b"}


def test_first_matching_rule_wins_and_names_itself(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, EXAMPLE))
    hard = rules.route(request(local=pred("8", 0.3)))
    assert hard is not None and hard.name == "hard-digits" and hard.strategy == "parallel"
    sure = rules.route(request(local=pred("8", 0.9)))  # confident: falls through to the next rule
    assert sure is not None and sure.name == "lab-any" and sure.route_to == ["digits-cloud-b", "digits-cloud"]
    other = rules.route(request(fleet="yard", local=pred("8", 0.3)))
    assert other is not None and other.name == "default" and other.route_to == ["digits-cloud"]


def test_no_match_and_no_default_is_no_route() -> None:
    rules = RuleSet(rules=[Rule(name="faces", when=When(model_hint="faces*"), route_to=["faces-cloud"])])
    assert rules.route(request(model_hint="digits")) is None
    assert rules.route(request(model_hint="faces-v2")) is rules.rules[0]


def test_rule_without_conditions_matches_everything() -> None:
    rules = RuleSet(rules=[Rule(name="all", route_to=["m"])])
    assert rules.route(request(fleet=None, model_hint=None)) is rules.rules[0]


@pytest.mark.parametrize(
    ("when", "req", "expected"),
    [
        (When(model_hint="digits*"), request(model_hint="digits-v2"), True),
        (When(model_hint="digits*"), request(model_hint="Digits"), False),  # globs are case-sensitive
        (When(model_hint="digits*"), request(model_hint=None), False),  # no hint never matches a glob
        (When(local_confidence_below=0.5), request(local=pred("3", 0.49)), True),
        (When(local_confidence_below=0.5), request(local=pred("3", 0.5)), False),  # strictly below
        (When(local_confidence_below=0.5), request(local=None), False),
        (When(local_label=["3", "5"]), request(local=pred("5", 0.9)), True),
        (When(local_label=["3", "5"]), request(local=pred("7", 0.9)), False),
        (When(local_label=["3", "5"]), request(local=None), False),
        (When(devices=["cam-*", "door"]), request("cam-07"), True),
        (When(devices=["cam-*", "door"]), request("door"), True),
        (When(devices=["cam-*", "door"]), request("gate-1"), False),
        (When(fleets=["lab", "yard-*"]), request(fleet="yard-2"), True),
        (When(fleets=["lab"]), request(fleet="prod"), False),
        (When(fleets=["lab"]), request(fleet=None), False),
    ],
)
def test_each_condition(when: When, req: Request, expected: bool) -> None:
    assert when.matches(req) is expected


def test_all_given_conditions_must_hold() -> None:
    when = When(model_hint="digits", devices=["cam-*"], local_label=["8"])
    assert when.matches(request("cam-1", local=pred("8", 0.2)))
    assert not when.matches(request("door", local=pred("8", 0.2)))
    assert not when.matches(request("cam-1", local=pred("3", 0.2)))


def test_request_without_a_fleet_attribute() -> None:
    """An envelope from before Request grew ``fleet`` still routes; fleet conditions just fail."""
    old = SimpleNamespace(device_id="cam-1", model_hint="digits", local=None)
    assert When(devices=["cam-*"]).matches(old)  # type: ignore[arg-type]
    assert not When(fleets=["lab"]).matches(old)  # type: ignore[arg-type]


def test_yaml_shorthands(tmp_path: Path) -> None:
    """Unquoted digit labels and single values instead of lists mean what the operator meant."""
    rules = load_rules(
        write(
            tmp_path,
            """\
            rules:
              - name: r
                when: {local_label: [3, 5], devices: cam-01, fleets: lab}
                route_to: digits-cloud
            """,
        )
    )
    rule = rules.rules[0]
    assert rule.when.local_label == ["3", "5"]
    assert (rule.when.devices, rule.when.fleets, rule.route_to) == (["cam-01"], ["lab"], ["digits-cloud"])


def test_parallel_aggregates_by_max_confidence_unless_told() -> None:
    assert Route(route_to=["a", "b"], strategy="parallel").aggregate == "max_confidence"
    assert Route(route_to=["a", "b"], strategy="parallel", aggregate="vote").aggregate == "vote"
    assert Route(route_to=["a"]).strategy == "first_success"


def test_default_rules() -> None:
    rules = default_rules("digits-cloud")
    route = rules.route(request(fleet=None, model_hint=None))
    assert route is not None and route.name == "default"
    assert (route.route_to, route.strategy) == (["digits-cloud"], "first_success")
    assert rules.rules == [] and rules.models() == {"digits-cloud"}


def test_only_a_default(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, "default: {route_to: [m1, m2], strategy: fallback}\n"))
    route = rules.route(request())
    assert route is not None and route.route_to == ["m1", "m2"] and route.strategy == "fallback"


# ---- wrong files are refused with file:line and the reason --------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "rules:\n  - name: a\n    when: {model_hint: x}\n    rout_to: [m]\n")
    assert f"{path}:4: rules.0.rout_to: unknown key -- did you mean 'route_to'?" in message
    assert f"{path}:2: rules.0.route_to: required field is missing" in message


def test_unknown_condition(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "rules:\n  - name: a\n    when:\n      device: [cam-1]\n    route_to: [m]\n")
    assert f"{path}:4: rules.0.when.device: unknown key -- did you mean 'devices'?" in message


def test_bad_strategy(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "default:\n  route_to: [m]\n  strategy: round_robin\n")
    assert f"{path}:3: default.strategy:" in message
    assert "'first_success', 'parallel' or 'fallback'" in message and "round_robin" in message


def test_empty_route_to(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "rules:\n  - name: a\n    route_to: []\n")
    assert f"{path}:3: rules.0.route_to:" in message and "name at least one Triton model" in message


def test_duplicate_model_in_route_to(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "default:\n  route_to: [m1, m2, m1]\n")
    assert f"{path}:2: default.route_to:" in message and "lists m1 more than once" in message


def test_bad_model_name(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "default:\n  route_to: ['digits cloud']\n")
    assert f"{path}:2: default.route_to:" in message and "'digits cloud'" in message


def test_aggregate_without_parallel_says_how_to_fix(tmp_path: Path) -> None:
    path, message = refused(
        tmp_path, "rules:\n  - name: a\n    route_to: [m1, m2]\n    strategy: fallback\n    aggregate: vote\n"
    )
    assert f"{path}:5: rules.0.aggregate:" in message
    assert "this route is 'fallback'" in message
    assert "remove 'aggregate' or set 'strategy: parallel'" in message
    # Without a strategy the route is first_success, which aggregates nothing either.
    path, message = refused(tmp_path, "default:\n  route_to: [m1]\n  aggregate: max_confidence\n")
    assert f"{path}:3: default.aggregate:" in message and "'first_success'" in message


def test_bad_aggregate(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "default:\n  route_to: [m]\n  strategy: parallel\n  aggregate: mean\n")
    assert f"{path}:4: default.aggregate:" in message and "'vote' or 'max_confidence'" in message


def test_duplicate_rule_names_point_at_the_second(tmp_path: Path) -> None:
    text = """\
    rules:
      - name: a
        when: {fleets: [lab]}
        route_to: [m1]
      - name: b
        when: {fleets: [yard]}
        route_to: [m2]
      - name: a
        when: {fleets: [prod]}
        route_to: [m3]
    """
    path, message = refused(tmp_path, text)
    assert f"{path}:8: rules.2:" in message and "already named 'a'" in message


def test_duplicate_name_is_caught_even_when_the_first_rule_is_also_wrong(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    route_to: []\n  - name: a\n    when: {fleets: [x]}\n    route_to: [m]\n"
    path, message = refused(tmp_path, text)
    assert f"{path}:3: rules.0.route_to:" in message
    assert f"{path}:4: rules.1:" in message and "already named 'a'" in message


def test_duplicate_rule_names_in_code() -> None:
    with pytest.raises(ValidationError, match="already named 'a'"):
        RuleSet(
            rules=[
                Rule(name="a", when=When(fleets=["x"]), route_to=["m"]),
                Rule(name="a", when=When(fleets=["y"]), route_to=["m"]),
            ]
        )


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_confidence_out_of_range(tmp_path: Path, value: str) -> None:
    path, message = refused(
        tmp_path, f"rules:\n  - name: a\n    when:\n      local_confidence_below: {value}\n    route_to: [m]\n"
    )
    assert f"{path}:4: rules.0.when.local_confidence_below:" in message and value in message


def test_non_positive_timeout(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "default:\n  route_to: [m]\n  timeout_ms: 0\n")
    assert f"{path}:3: default.timeout_ms:" in message


def test_empty_condition_list(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "rules:\n  - name: a\n    when: {devices: []}\n    route_to: [m]\n")
    assert f"{path}:3: rules.0.when.devices:" in message and "remove the key to match any" in message


def test_bad_rule_name(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "rules:\n  - name: ''\n    route_to: [m]\n")
    assert f"{path}:2: rules.0.name:" in message


def test_rule_behind_a_catch_all_is_refused(tmp_path: Path) -> None:
    text = """\
    rules:
      - name: everything
        route_to: [m1]
      - name: digits
        when: {model_hint: digits}
        route_to: [m2]
    """
    path, message = refused(tmp_path, text)
    assert f"{path}:4: rules.1:" in message
    assert "'digits' never applies; move 'everything' last" in message


def test_default_behind_a_catch_all_is_refused(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "rules:\n  - name: all\n    route_to: [m1]\ndefault:\n  route_to: [m2]\n")
    assert f"{path}:4: default:" in message and "'default' never applies" in message
    with pytest.raises(ValidationError, match="'default' never applies"):
        RuleSet(rules=[Rule(name="all", route_to=["m1"])], default=Route(route_to=["m2"]))


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path, message = refused(tmp_path, "# nothing yet\n")
    assert str(path) in message and "every request would be rejected" in message


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    route_to: []\n    strategy: sometimes\ndefault:\n  route_to: [m, m]\n"
    path, message = refused(tmp_path, text)
    for where in (f"{path}:3: rules.0.route_to:", f"{path}:4: rules.0.strategy:", f"{path}:6: default.route_to:"):
        assert where in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_rules(tmp_path / "nope.yaml")


# ---- aggregation --------------------------------------------------------------------------


def test_max_confidence_takes_the_surest_answer() -> None:
    answers = [pred("3", 0.6), pred("8", 0.95, margin=0.7), pred("3", 0.7)]
    assert aggregate(answers, "max_confidence") == answers[1]
    assert aggregate(answers, None) == answers[1]  # None is the default for parallel


def test_max_confidence_tie_goes_to_the_first() -> None:
    answers = [pred("3", 0.8), pred("5", 0.8)]
    assert aggregate(answers, "max_confidence") is answers[0]


def test_vote_majority_beats_one_overconfident_model() -> None:
    answers = [pred("3", 0.6, margin=0.2), pred("8", 0.99, margin=0.9), pred("3", 0.7, margin=0.4)]
    result = aggregate(answers, "vote")
    assert result.label == "3" and result.class_index == 3
    assert result.confidence == pytest.approx(0.65)  # mean of the winning voters
    assert result.margin == 0.4  # that of the most confident voter


def test_vote_tie_goes_to_the_larger_summed_confidence() -> None:
    answers = [pred("3", 0.9), pred("8", 0.6, margin=0.3), pred("3", 0.1), pred("8", 0.7, margin=0.5)]
    result = aggregate(answers, "vote")
    assert result.label == "8"
    assert result.confidence == pytest.approx(0.65)
    assert result.margin == 0.5


def test_vote_full_tie_goes_to_the_label_answered_first() -> None:
    assert aggregate([pred("5", 0.5), pred("2", 0.5)], "vote").label == "5"
    assert aggregate([pred("2", 0.5), pred("5", 0.5)], "vote").label == "2"


def test_vote_of_one() -> None:
    only = pred("7", 0.42, margin=0.1)
    assert aggregate([only], "vote") == only


def test_aggregate_refuses_nothing_and_unknown_methods() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        aggregate([], "vote")
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregate([pred("1", 0.5)], "mean")


def detect_request(labels: list[str]) -> Request:
    detections = [Detection(box=[0.0, 0.0, 9.0, 9.0], score=0.5, class_index=0, label=lb) for lb in labels]
    return request().model_copy(update={"task": "detect", "detections": detections})


@pytest.mark.parametrize(
    ("when", "req", "expected"),
    [
        (When(task="detect"), detect_request(["3"]), True),
        (When(task="detect"), request(), False),  # a classify request
        (When(task="classify"), request(), True),
        (When(classes=["3", "8"]), detect_request(["1", "8"]), True),  # any detection's label
        (When(classes=["3", "8"]), detect_request(["1", "2"]), False),
        (When(classes=["3", "8"]), detect_request([]), False),
        (When(classes=[8]), request(local=pred("8", 0.9)), True),  # a classification's local label
    ],
)
def test_task_and_class_conditions(when: When, req: Request, expected: bool) -> None:
    assert when.matches(req) is expected


def test_merge_policy_is_checked_when_the_rules_load(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: crops\n    when: {task: detect}\n    route_to: m\n    merge: relabel\n")
    assert load_rules(path).rules[0].merge == "relabel"
    path.write_text("rules:\n  - name: crops\n    when: {task: detect}\n    route_to: m\n    merge: overwrite\n")
    with pytest.raises(ConfigError, match="merge"):
        load_rules(path)
    assert Route(route_to=["m"]).merge is None  # chosen by the model's task at dispatch


# ---- tiers: a site's bridge falls back to the cloud ---------------------------------------

SITE = """\
upstream: {prefix: cloud/, max_local_queue: 8}
default:
  route_to: [digits-site, "tier:cloud"]
  strategy: fallback
  min_confidence: 0.8
"""


def test_a_site_route_serves_here_first_then_hands_up(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, SITE))
    route = rules.route(request())
    assert route is not None and route.hands_up and rules.models() == {"digits-site"}
    assert rules.upstream is not None and (rules.upstream.prefix, rules.upstream.max_local_queue) == ("cloud/", 8)
    here = route.at_this_tier()
    assert here is not None and here.route_to == ["digits-site"] and not here.hands_up
    assert route.unsure(pred("3", 0.79)) and not route.unsure(pred("3", 0.8)) and not route.unsure(None)
    only_up = Route(route_to=["tier:cloud"])
    assert only_up.hands_up and only_up.at_this_tier() is None
    plain = Route(route_to=["m1", "m2"], strategy="fallback")
    assert not plain.hands_up and plain.at_this_tier() is plain and not plain.unsure(pred("3", 0.01))


def test_tier_cloud_only_last_only_with_fallback_and_only_with_an_upstream(tmp_path: Path) -> None:
    path, message = refused(tmp_path, 'upstream: {}\ndefault:\n  route_to: ["tier:cloud", m]\n  strategy: fallback\n')
    assert f"{path}:3: default.route_to:" in message and "can only be the last target" in message
    path, message = refused(tmp_path, 'upstream: {}\ndefault:\n  route_to: [m, "tier:cloud"]\n')
    assert "needs one target after another, and this route is 'first_success'" in message
    assert "set 'strategy: fallback'" in message
    path, message = refused(tmp_path, SITE.split("\n", 1)[1])
    assert "there is no 'upstream'" in message and "add 'upstream: {prefix: cloud/}'" in message
    path, message = refused(tmp_path, "default:\n  route_to: [m]\n  min_confidence: 0.5\n")
    assert "'min_confidence' decides when to ask the next target, and this route has one" in message
    path, message = refused(tmp_path, "upstream: {prefix: cloud}\ndefault: {route_to: [m]}\n")
    assert f"{path}:1: upstream.prefix:" in message
