"""Coverage-guided fuzzing of tests/fuzz_targets.py with atheris (libFuzzer), where it installs
(the ``dev`` extra has it on Linux, Python 3.10-3.12).

    python -m tests.fuzz_atheris TARGET [libFuzzer options] [CORPUS_DIR ...]
    python -m tests.fuzz_atheris fleet_file -runs=20000 /tmp/fleet-corpus

Targets: device_config, fleet_file, rule_file, image_header. With ``--seed-corpus DIR`` the
shipped examples are written to DIR first, so mutations start from documents that validate.
An input that ends in anything but a valid result or the module's clear error stops the run
with the traceback and a ``crash-*`` file (``-artifact_prefix``) to turn into a regression test.
tests/test_fuzz_loaders.py runs every target for a stated number of inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["edgewire"]):
    from tests import fuzz_targets


def seed_corpus(folder: Path, target: str) -> None:
    """The shipped example of the target's file type, so the fuzzer starts from a valid one."""
    root = Path(__file__).resolve().parents[1]
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {
        "device_config": [root / "firmware_configs" / "device.example.yaml"],
        "fleet_file": [root / "firmware_configs" / "fleet.example.yaml"],
        "rule_file": [],
        "image_header": [],
    }[target]
    for i, path in enumerate(seeds):
        (folder / f"seed-{i}").write_bytes(path.read_bytes())
    if target == "rule_file":
        from tests.test_rules import EXAMPLE

        (folder / "seed-0").write_text(EXAMPLE)
    if target == "image_header":
        (folder / "seed-0").write_bytes(b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x30\x00\x40\x03" + bytes(9))
        (folder / "seed-1").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x40\x00\x00\x00\x30")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in fuzz_targets.TARGETS:
        sys.exit(f"usage: python -m tests.fuzz_atheris {{{','.join(fuzz_targets.TARGETS)}}} [libFuzzer options]")
    target = argv[1]
    rest = argv[2:]
    if "--seed-corpus" in rest:
        at = rest.index("--seed-corpus")
        folder = Path(rest[at + 1])
        seed_corpus(folder, target)
        rest = [*rest[:at], *rest[at + 2 :], str(folder)]
    atheris.Setup([argv[0], *rest], fuzz_targets.TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
