"""Every file decoder fuzzed: device configs, fleet files (rendered as `edgewire flash` does),
the bridge's routing rules, and image headers. Each input ends in a valid result or the
module's clear error (ConfigError naming the file; ``None`` for a header), never another
exception (tests/fuzz_targets.py says what each target accepts).

Inputs are random bytes and text, YAML of the wrong shapes, and the shipped examples with
values replaced, keys deleted or added at random places, so validation is reached deep inside
each model, not only the YAML parser. CI runs the number of inputs set below per target
(``FUZZ_EXAMPLES``, printed with -s); tests/fuzz_atheris.py runs the same targets
coverage-guided where atheris is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgewire.config import load_device_config
from edgewire.errors import ConfigError

from . import fuzz_targets
from .conftest import ROOT
from .test_rules import EXAMPLE as RULES_EXAMPLE

FUZZ_EXAMPLES = 300
#: Inputs per target for the coverage-guided run (tests/fuzz_atheris.py), where atheris installs.
ATHERIS_RUNS = 1000
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEEDS: dict[str, Any] = {
    "device_config": yaml.safe_load((ROOT / "firmware_configs" / "device.example.yaml").read_text()),
    "fleet_file": yaml.safe_load((ROOT / "firmware_configs" / "fleet.example.yaml").read_text())
    | {"client_certificates": {"ca_dir": "fleet-ca", "broker_names": ["broker.lab.example"]}}
    | {"broker": {"url": "mqtts://broker.lab.example:8883"}},
    "rule_file": yaml.safe_load(RULES_EXAMPLE),
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", "..", "/", "*", "mqtt://", "mqtts://h:0", "auto", "+", "#", "ü", "a" * 300, "1e400"]),
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
#: One edit of a document: which node (an index taken modulo the node count), and what to do.
edits = st.tuples(
    st.integers(0, 10_000), st.sampled_from(["replace", "delete", "add", "wrap"]), values, st.text(max_size=10)
)


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _nodes(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _nodes(value, (*path, index))
    return found


def mutate(seed: Any, changes: list[tuple[int, str, Any, str]]) -> Any:
    """The seed document with each edit applied at the node it picks."""
    doc = copy.deepcopy(seed)
    for index, action, value, new_key in changes:
        paths = _nodes(doc)
        path = paths[index % len(paths)]
        if not path:
            doc = value if action == "replace" else doc
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        if action == "replace":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif action == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):
            parent[new_key] = value
        else:
            parent.append(value)
    return doc


def _dump(doc: Any) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode()


def documents(target: str) -> st.SearchStrategy[bytes]:
    seed = SEEDS[target]
    return st.one_of(
        st.builds(mutate, st.just(seed), st.lists(edits, min_size=1, max_size=4)).map(_dump),
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        values.map(_dump),
        st.sampled_from(
            [
                b"",
                b"\xef\xbb\xbf" + _dump(seed),  # a BOM
                _dump(seed) + b"\x00",
                b"\xff\xfe" + _dump(seed),
                b"a: &x [*x]",
                b"!!python/object/apply:os.system ['true']",
                b"- " * 5_000 + b"x",
                b"[" * 2_000,
                b"{a: 1, a: 2}",
                _dump(seed).replace(b"\n", b"\r"),
            ]
        ),
    )


_counts: dict[str, dict[str, int]] = {}


def _run(target: str, data: bytes) -> None:
    result = fuzz_targets.TARGETS[target](data)
    outcome = _counts.setdefault(target, {"valid": 0, "refused": 0})
    outcome["valid" if result is not None else "refused"] += 1


@FUZZ
@given(documents("device_config"))
def test_device_config_files(data: bytes) -> None:
    _run("device_config", data)


@FUZZ
@given(documents("fleet_file"))
def test_fleet_files(data: bytes) -> None:
    _run("fleet_file", data)


@FUZZ
@given(documents("rule_file"))
def test_rule_files(data: bytes) -> None:
    _run("rule_file", data)


def _image_headers() -> st.SearchStrategy[bytes]:
    jpeg_segments = st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=12)).map(
            lambda m: b"\xff" + bytes([m[0]]) + (len(m[1]) + 2).to_bytes(2, "big") + m[1]
        ),
        max_size=6,
    )
    return st.one_of(
        st.binary(max_size=300),
        jpeg_segments.map(lambda segments: b"\xff\xd8" + b"".join(segments)),
        st.binary(max_size=40).map(lambda rest: b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + rest),
    )


@FUZZ
@given(_image_headers())
def test_image_headers(data: bytes) -> None:
    _run("image_header", data)


#: Where atheris ships wheels (the dev extra installs it there); elsewhere the coverage-guided
#: run is not collected at all, so CI on another Python does not fail for a wheel that does not exist.
ATHERIS_WHEELS = sys.platform == "linux" and sys.version_info < (3, 13)


if ATHERIS_WHEELS:

    @pytest.mark.parametrize("target", list(fuzz_targets.TARGETS))
    def test_atheris_runs_each_target(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The same targets, coverage-guided by libFuzzer from the shipped examples (a child process:
        libFuzzer ends the process it runs in). Skipped where atheris is not installed (it is in
        the dev extra on Linux, Python 3.10-3.12)."""
        if importlib.util.find_spec("atheris") is None:
            pytest.skip("atheris is not installed (pip install -e '.[dev]' on Linux, Python 3.10-3.12)")
        options = [f"-runs={ATHERIS_RUNS}", "-max_len=4096", "-seed=1", f"-artifact_prefix={tmp_path}/"]
        run = subprocess.run(
            [sys.executable, "-m", "tests.fuzz_atheris", target, *options, "--seed-corpus", str(tmp_path / "corpus")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        done = re.search(r"Done (\d+) runs", run.stderr)
        assert done is not None and int(done.group(1)) == ATHERIS_RUNS, run.stderr[-2000:]
        with capsys.disabled():
            print(f"\natheris: {target}: {done.group(1)} inputs, no crash")


def test_the_seeds_are_valid_so_mutations_start_deep(tmp_path: Path) -> None:
    """Each seed passes unchanged: the fuzzing starts from a document that gets past validation."""
    for target in SEEDS:
        assert fuzz_targets.TARGETS[target](_dump(SEEDS[target])) is not None, target


def test_zz_inputs_per_target_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this file: the stated number of inputs per target, and how they ended."""
    for target in fuzz_targets.TARGETS:
        counts = _counts.get(target, {})
        if counts:  # the target ran in this session (not deselected)
            assert sum(counts.values()) >= FUZZ_EXAMPLES // 2, (target, counts)
    with capsys.disabled():
        print(f"\nfuzz: {FUZZ_EXAMPLES} inputs per target; outcomes: {_counts}")


@pytest.mark.parametrize("target", ["device_config", "fleet_file", "rule_file"])
@pytest.mark.parametrize(
    "data",
    [b"[" * 10_000, b"- " * 5_000 + b"x", b"a: &x [*x]", b"a: &x {b: *x}"],
    ids=["brackets", "dashes", "list-alias", "map-alias"],
)
def test_found_by_fuzzing_deep_nesting_and_self_referring_aliases_are_config_errors(target: str, data: bytes) -> None:
    """Were RecursionError out of the YAML parser or the line finder (fuzzing found them)."""
    assert fuzz_targets.TARGETS[target](data) is None


def test_found_by_fuzzing_a_broker_name_that_is_no_host_name_is_a_config_error() -> None:
    """Was ValueError out of `cryptography` (a DNS name must be ASCII) when the broker's files
    were rendered; now the fleet file is refused with the field and the fix."""
    doc = SEEDS["fleet_file"] | {"client_certificates": {"ca_dir": "fleet-ca", "broker_names": ["ü"]}}
    assert fuzz_targets.fleet_file(_dump(doc)) is None
    doc["client_certificates"]["broker_names"] = ["::1", "broker.lab.example"]
    rendered = fuzz_targets.fleet_file(_dump(doc))
    assert rendered is not None and "server.pem" in rendered[-1].files


def test_a_key_holding_line_breaks_is_refused_on_one_line_per_problem(tmp_path: Path) -> None:
    """Found by the fuzzer: a key made of a carriage return and a NEL (a line break to
    ``str.splitlines``) once split a problem over two lines, and the fleet renderer failed on the
    half without a field. Such a key is shown escaped and the file refused as any other."""
    fleet = copy.deepcopy(SEEDS["fleet_file"])
    fleet["defaults"]["model"] = {"\r\x85": None}
    assert fuzz_targets.fleet_file(_dump(fleet)) is None
    device = copy.deepcopy(SEEDS["device_config"])
    device["model"] = {"\r\x85": None}
    path = tmp_path / "device.yaml"
    path.write_bytes(_dump(device))
    with pytest.raises(ConfigError) as caught:
        load_device_config(path)
    problems = str(caught.value).splitlines()[1:]
    assert problems and all(line.startswith(f"  {path}") for line in problems), problems
    assert any("model.'\\r\\x85'" in line for line in problems), problems
