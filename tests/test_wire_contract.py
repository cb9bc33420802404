"""topics.md is the contract; these tests fail when the code drifts from it."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from edgewire import envelopes as env
from edgewire import topics
from edgewire.errors import TopicError

DOC = (Path(__file__).resolve().parents[1] / "topics.md").read_text()


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
    return rows


def _doc_topics() -> dict[str, list[str]]:
    section = DOC.split("## Topics", 1)[1].split("\n## ", 1)[0]
    rows = _table_rows(section)
    assert rows[0] == ["name", "topic", "direction", "qos", "retain", "payload"]
    return {r[0]: r for r in rows[1:]}


def _doc_payloads() -> dict[str, list[str]]:
    section = DOC.split("## Payloads", 1)[1]
    out = {}
    for block in section.split("\n### ")[1:]:
        name, body = block.split("\n", 1)
        rows = _table_rows(body)
        assert rows[0] == ["field", "type", "meaning"]
        out[name.strip()] = [r[0] for r in rows[1:]]
    return out


def _model_of(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found:
            return found
    return None


def _is_list(annotation: object) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _flatten(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        names.append(prefix + name)
        nested = _model_of(field.annotation)
        if nested is not None:
            names += _flatten(nested, prefix + name + ("[]." if _is_list(field.annotation) else "."))
    return names


def test_every_documented_topic_is_in_code_and_back() -> None:
    doc = _doc_topics()
    assert set(doc) == set(topics.TOPICS)
    for name, (_, pattern, direction, qos, retain, payload) in doc.items():
        spec = topics.TOPICS[name]
        assert spec.pattern == pattern
        assert spec.direction == direction
        assert spec.qos == int(qos)
        assert spec.retain == (retain == "yes")
        assert spec.payload.__name__ == payload


@pytest.mark.parametrize("name", sorted(topics.TOPICS))
def test_every_topic_builds_and_parses(name: str) -> None:
    spec = topics.TOPICS[name]
    values = {p: ("7" if p == "index" else f"{p.replace('_', '-')}-1") for p in spec.params}
    topic = spec.build(**values)
    parsed = topics.parse(topic)
    assert parsed.spec is spec
    assert parsed.values == values
    assert topics.parse(f"$share/bridges/{topic}").spec is spec


def test_every_payload_field_list_matches_its_envelope() -> None:
    doc = _doc_payloads()
    assert set(doc) == set(env.ENVELOPES)
    for name, fields in doc.items():
        assert fields == _flatten(env.ENVELOPES[name]), name


def test_device_id_is_its_own_level_wherever_a_device_publishes() -> None:
    for spec in topics.TOPICS.values():
        if spec.direction.startswith("device"):
            assert "{device_id}" in spec.levels, spec.name


@pytest.mark.parametrize(
    "bad",
    ["", "req/a", "req/a/b/c", "result/a/b", "nope/x", "req/+/x", "req/a#/b", "model/chunk/m/1/x1"],
)
def test_unknown_topics_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(bad)


@pytest.mark.parametrize("value", ["", "+", "#", "a/b", "-lead", "x" * 129, "sp ace"])
def test_bad_level_values_cannot_be_built(value: str) -> None:
    with pytest.raises(TopicError):
        topics.RESULT.build(device_id=value)


def test_filters_and_shared_filters() -> None:
    assert topics.REQUEST.filter() == "req/+/+"
    assert topics.REQUEST.filter(device_id="cam-1") == "req/cam-1/+"
    assert topics.REQUEST.shared_filter("bridges") == "$share/bridges/req/+/+"
    with pytest.raises(TopicError):
        topics.REQUEST.filter(nope="x")
