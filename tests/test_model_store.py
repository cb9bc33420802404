"""The device's model store: chunk checks, resume after close, kill -9 and lost writes, verification and
signatures, installed versions, activation with rollback target and pruning, failures that persist."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import namedtuple
from pathlib import Path

import pytest

from edgewire import envelopes as env
from edgewire import signing
from edgewire.edge import model_store
from edgewire.edge.download import ChunkRejected, ChunksCorrupt, Download, StoreError, VerifyFailed
from edgewire.edge.model_store import ModelStore
from edgewire.metrics import Meter

KEY_PEM, PUBLIC_LINE = signing.generate()
PRIVATE = signing.load_private(KEY_PEM)
PUBLIC = signing.load_public(PUBLIC_LINE)
KIB = 1024


def artefact(
    size: int,
    chunk_size: int,
    *,
    name: str = "digits",
    version: str = "1",
    fmt: str = "onnx",
    data: bytes | None = None,
    sha256: str | None = None,
    signed: bool = True,
    signature: bytes | None = None,
) -> tuple[bytes, env.Manifest, list[env.Chunk]]:
    """Random bytes, their signed manifest and their chunks, as the distributor would send them."""
    data = os.urandom(size) if data is None else data
    digest = hashlib.sha256(data).digest()
    if signature is None and signed:
        signature = signing.sign(PRIVATE, digest)
    count = -(-size // chunk_size)
    manifest = env.Manifest(
        name=name,
        version=version,
        format=fmt,
        precision="fp32",
        size=size,
        sha256=sha256 or digest.hex(),
        chunk_size=chunk_size,
        chunk_count=count,
        inputs=[env.TensorSpec(name="x", dtype="float32", shape=[1, 64])],
        outputs=[env.TensorSpec(name="y", dtype="float32", shape=[1, 10])],
        signature=signature,
        created=time.time(),
    )
    chunks = [chunk_of(name, version, i, data[i * chunk_size : (i + 1) * chunk_size]) for i in range(count)]
    return data, manifest, chunks


def chunk_of(name: str, version: str, index: int, data: bytes, sha256: str | None = None) -> env.Chunk:
    return env.Chunk(
        name=name, version=version, index=index, sha256=sha256 or hashlib.sha256(data).hexdigest(), data=data
    )


def store_at(root: Path, **kwargs: object) -> ModelStore:
    kwargs.setdefault("public_key", PUBLIC)
    kwargs.setdefault("meter", Meter("test"))
    return ModelStore(root, **kwargs)  # type: ignore[arg-type]


def install(store: ModelStore, version: str, *, name: str = "digits", size: int = 10 * KIB) -> Path:
    _, manifest, chunks = artefact(size, 4 * KIB, name=name, version=version)
    download = store.download(manifest)
    for c in chunks:
        download.write(c)
    return store.verify_and_install(download)


def partial_dir(root: Path, name: str = "digits", version: str = "1") -> Path:
    return root / name / ".partial" / version


# ---- downloading ----------------------------------------------------------------------------------


def test_clean_download_in_random_order_installs_the_same_bytes(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    data, manifest, chunks = artefact(1 * 1024 * KIB + 123, 64 * KIB)
    download = store.download(manifest)
    assert (partial_dir(tmp_path) / "data").stat().st_size == manifest.size  # preallocated
    assert store.download(manifest) is download  # one open download per version
    order = list(range(len(chunks)))
    random.Random(7).shuffle(order)
    for n, i in enumerate(order, 1):
        assert download.write(chunks[i]) is True
        assert download.received == n
    assert download.complete and download.progress == 1.0 and download.missing() == []
    path = store.verify_and_install(download)
    assert path == tmp_path / "digits" / "1" / "model.onnx"
    assert path.read_bytes() == data
    assert store.manifest_of("digits", "1") == manifest
    assert store.path_of("digits", "1") == path
    assert store.installed("digits") == ["1"]
    assert not partial_dir(tmp_path).exists()
    assert store.meter.get("model_chunks_received_total") == len(chunks)


def test_sidecar_records_each_held_chunks_digest(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = store.download(manifest)
    download.write(chunks[1])
    download.close()
    table = (partial_dir(tmp_path) / "chunks").read_bytes()
    assert len(table) == 3 * 32
    assert table[32:64] == hashlib.sha256(chunks[1].data).digest()
    assert table[:32] == table[64:] == bytes(32)


def test_tensorrt_plan_installs_with_its_suffix(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    data, manifest, chunks = artefact(5000, 4 * KIB, fmt="tensorrt-plan")
    download = store.download(manifest)
    for c in chunks:
        download.write(c)
    path = store.verify_and_install(download)
    assert path == tmp_path / "digits" / "1" / "model.plan" and path.read_bytes() == data


def test_duplicate_chunk_is_not_new_and_is_counted(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = store.download(manifest)
    assert download.write(chunks[0]) is True
    assert download.write(chunks[0]) is False
    assert download.received == 1
    assert store.meter.get("model_chunks_duplicate_total") == 1
    assert store.meter.get("model_chunks_received_total") == 1


def _bad_chunks(chunks: list[env.Chunk]) -> dict[str, tuple[str, env.Chunk]]:
    c = chunks[1]
    return {
        "no checksum": ("checksum", chunk_of("digits", "1", 1, c.data, sha256="not hex")),
        "short": ("size", chunk_of("digits", "1", 1, c.data[:-1])),
        "long last": ("size", chunk_of("digits", "1", 2, chunks[2].data + b"x")),
        "index too high": ("index", chunk_of("digits", "1", 3, chunks[2].data)),
        "negative index": ("index", chunk_of("digits", "1", -1, c.data)),
        "other version": ("foreign", chunk_of("digits", "2", 1, c.data)),
        "other model": ("foreign", chunk_of("faces", "1", 1, c.data)),
    }


@pytest.mark.parametrize("case", list(_bad_chunks(artefact(10 * KIB, 4 * KIB)[2])))
def test_bad_chunks_are_rejected_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    reason, bad = _bad_chunks(chunks)[case]
    download = store.download(manifest)
    with pytest.raises(ChunkRejected, match=f"chunk {bad.index}"):
        download.write(bad)
    download.close()
    assert download.received == 0
    assert store.meter.get("model_chunks_rejected_total", reason=reason) == 1
    assert (partial_dir(tmp_path) / "data").read_bytes() == bytes(manifest.size)
    assert (partial_dir(tmp_path) / "chunks").read_bytes() == bytes(3 * 32)


def test_write_after_close_is_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = store.download(manifest)
    download.close()
    with pytest.raises(StoreError, match="closed"):
        download.write(chunks[0])


def test_missing_ranges_merge_runs(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * 100 - 30, 100)
    download = store.download(manifest)
    assert download.missing_ranges() == [[0, 10]]
    for i in (0, 1, 4, 7, 8):
        download.write(chunks[i])
    assert download.missing() == [2, 3, 5, 6, 9]
    assert download.missing_ranges() == [[2, 4], [5, 7], [9, 10]]
    assert download.progress == pytest.approx(0.5)
    for i in (2, 3, 5, 6, 9):
        download.write(chunks[i])
    assert download.missing_ranges() == []


# ---- manifests the store refuses ------------------------------------------------------------------


def test_unknown_format_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    _, manifest, _ = artefact(10 * KIB, 4 * KIB, fmt="tflite")
    with pytest.raises(StoreError) as err:
        store_at(tmp_path).download(manifest)
    assert str(err.value) == "unknown format 'tflite' (known: onnx, tensorrt-plan)"


def test_inconsistent_chunk_count_is_refused(tmp_path: Path) -> None:
    _, manifest, _ = artefact(10 * KIB, 4 * KIB)
    with pytest.raises(StoreError, match="chunk_count 4"):
        store_at(tmp_path).download(manifest.model_copy(update={"chunk_count": 4}))


def test_model_larger_than_free_disk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 5000, 5000))
    _, manifest, _ = artefact(10 * KIB, 4 * KIB)
    with pytest.raises(StoreError, match="only 5000 are free"):
        store_at(tmp_path).download(manifest)
    assert not partial_dir(tmp_path).exists()


@pytest.mark.parametrize("version", ["../escape", ".partial", "a/b", "", "state.json"])
def test_versions_that_are_not_safe_directory_names_are_refused(tmp_path: Path, version: str) -> None:
    _, manifest, _ = artefact(10 * KIB, 4 * KIB, version=version)
    with pytest.raises(StoreError, match="cannot be stored"):
        store_at(tmp_path).download(manifest)


# ---- resume ---------------------------------------------------------------------------------------


def test_resume_after_close_in_a_new_store(tmp_path: Path) -> None:
    data, manifest, chunks = artefact(8 * 4 * KIB, 4 * KIB)
    first = store_at(tmp_path).download(manifest)
    for i in range(0, 8, 2):
        first.write(chunks[i])
    first.close()
    store = store_at(tmp_path)
    again = store.download(manifest)
    assert again.received == 4
    assert again.missing() == [1, 3, 5, 7]
    assert store.meter.get("model_downloads_resumed_total") == 1
    for i in again.missing():
        again.write(chunks[i])
    assert store.verify_and_install(again).read_bytes() == data


def test_resume_after_kill_9(tmp_path: Path) -> None:
    data, manifest, chunks = artefact(16 * 4 * KIB, 4 * KIB)
    (tmp_path / "manifest").write_bytes(env.encode(manifest))
    for c in chunks[:10]:
        (tmp_path / f"chunk{c.index}").write_bytes(env.encode(c))
    script = f"""
import os, signal
from pathlib import Path
from edgewire import envelopes as env
from edgewire.edge.model_store import ModelStore
root = Path({str(tmp_path)!r})
d = ModelStore(root / "store", public_key=None).download(env.decode(env.Manifest, (root / "manifest").read_bytes()))
for i in range(10):
    d.write(env.decode(env.Chunk, (root / f"chunk{{i}}").read_bytes()))
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    store = store_at(tmp_path / "store")
    download = store.download(manifest)
    assert download.received == 10 and download.missing() == list(range(10, 16))
    for c in chunks[10:]:
        download.write(c)
    assert store.verify_and_install(download).read_bytes() == data


def test_held_chunks_whose_bytes_changed_on_disk_become_missing(tmp_path: Path) -> None:
    _, manifest, chunks = artefact(8 * 4 * KIB, 4 * KIB)
    first = store_at(tmp_path).download(manifest)
    for c in chunks[:6]:
        first.write(c)
    first.close()
    data_file = partial_dir(tmp_path) / "data"
    with open(data_file, "r+b") as f:
        f.seek(2 * 4 * KIB + 100)
        f.write(b"\xff\x00\xff")
    # A record that reached the disk before its data did (power cut without fsync).
    with open(partial_dir(tmp_path) / "chunks", "r+b") as f:
        f.seek(7 * 32)
        f.write(hashlib.sha256(chunks[7].data).digest())
    store = store_at(tmp_path)
    download = store.download(manifest)
    assert download.missing() == [2, 6, 7]
    assert download.received == 5
    assert download.invalidated == 2
    table = (partial_dir(tmp_path) / "chunks").read_bytes()
    assert table[2 * 32 : 3 * 32] == table[7 * 32 : 8 * 32] == bytes(32)


def test_partial_of_another_artefact_for_the_same_version_starts_over(tmp_path: Path) -> None:
    _, old, old_chunks = artefact(8 * 4 * KIB, 4 * KIB)
    first = store_at(tmp_path).download(old)
    for c in old_chunks[:4]:
        first.write(c)
    first.close()
    data, new, new_chunks = artefact(8 * 4 * KIB, 4 * KIB)
    store = store_at(tmp_path)
    download = store.download(new)
    assert download.received == 0 and download.missing_ranges() == [[0, 8]]
    assert store.meter.get("model_downloads_resumed_total") == 0
    for c in new_chunks:
        download.write(c)
    assert store.verify_and_install(download).read_bytes() == data


def test_reopened_manifest_with_other_chunking_in_the_same_store_starts_over(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    data, manifest, chunks = artefact(8 * 4 * KIB, 4 * KIB)
    first = store.download(manifest)
    for c in chunks[:4]:
        first.write(c)
    _, rechunked, new_chunks = artefact(8 * 4 * KIB, 8 * KIB, data=data)
    second = store.download(rechunked)
    assert first.closed and second is not first
    assert second.received == 0 and second.manifest.chunk_count == 4
    for c in new_chunks:
        second.write(c)
    assert store.verify_and_install(second).read_bytes() == data


def test_discard_partial_removes_the_download(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = store.download(manifest)
    download.write(chunks[0])
    store.discard_partial("digits", "1")
    assert download.closed and not partial_dir(tmp_path).exists()
    assert store.download(manifest).received == 0


# ---- verification ---------------------------------------------------------------------------------


def _complete(store: ModelStore, manifest: env.Manifest, chunks: list[env.Chunk]) -> Download:
    download = store.download(manifest)
    for c in chunks:
        download.write(c)
    return download


def test_truncated_file_fails_and_the_partial_is_discarded(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = _complete(store, manifest, chunks)
    os.truncate(partial_dir(tmp_path) / "data", manifest.size - 1)
    with pytest.raises(VerifyFailed, match="size mismatch"):
        store.verify_and_install(download)
    assert not partial_dir(tmp_path).exists()
    assert store.path_of("digits", "1") is None
    assert store.download(manifest).received == 0


def test_wrong_whole_file_sha256_fails_and_the_partial_is_discarded(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    wrong = hashlib.sha256(b"something else").hexdigest()
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB, sha256=wrong)
    with pytest.raises(VerifyFailed, match="sha256 mismatch"):
        store.verify_and_install(_complete(store, manifest, chunks))
    assert not partial_dir(tmp_path).exists()
    assert store.installed("digits") == []
    assert store.meter.get("model_verify_failed_total") == 1


def test_incomplete_download_cannot_be_installed_and_is_kept(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = _complete(store, manifest, chunks[:2])
    with pytest.raises(StoreError, match="2 of 3"):
        store.verify_and_install(download)
    assert store.download(manifest).received == 2


@pytest.mark.parametrize("allow_unsigned", [False, True])
@pytest.mark.parametrize("forgery", ["other digest", "other key"])
def test_bad_signature_always_fails(tmp_path: Path, allow_unsigned: bool, forgery: str) -> None:
    data = os.urandom(10 * KIB)
    if forgery == "other digest":
        signature = signing.sign(PRIVATE, hashlib.sha256(b"another model").digest())
    else:
        signature = signing.sign(signing.load_private(signing.generate()[0]), hashlib.sha256(data).digest())
    _, manifest, chunks = artefact(len(data), 4 * KIB, data=data, signature=signature)
    store = store_at(tmp_path, allow_unsigned=allow_unsigned)
    with pytest.raises(VerifyFailed, match="bad signature"):
        store.verify_and_install(_complete(store, manifest, chunks))
    assert store.path_of("digits", "1") is None and not partial_dir(tmp_path).exists()


def test_missing_signature_fails_unless_unsigned_models_are_allowed(tmp_path: Path) -> None:
    data, manifest, chunks = artefact(10 * KIB, 4 * KIB, signed=False)
    strict = store_at(tmp_path / "strict")
    with pytest.raises(VerifyFailed, match="no signature"):
        strict.verify_and_install(_complete(strict, manifest, chunks))
    lenient = store_at(tmp_path / "lenient", allow_unsigned=True)
    assert lenient.verify_and_install(_complete(lenient, manifest, chunks)).read_bytes() == data


def test_signed_model_without_a_fleet_key_fails_when_signatures_are_required(tmp_path: Path) -> None:
    store = store_at(tmp_path, public_key=None)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    with pytest.raises(VerifyFailed, match="no fleet public key"):
        store.verify_and_install(_complete(store, manifest, chunks))


def test_memory_stays_bounded_while_writing_resuming_and_verifying(tmp_path: Path) -> None:
    size, chunk_size = 24 * 1024 * KIB, 256 * KIB
    data, manifest, chunks = artefact(size, chunk_size)
    del data
    tracemalloc.start()
    try:
        first = store_at(tmp_path).download(manifest)
        for c in chunks[:60]:
            first.write(c)
        first.close()
        tracemalloc.reset_peak()
        store = store_at(tmp_path)
        download = store.download(manifest)  # re-hashes the 60 held chunks from disk
        for c in chunks[60:]:
            download.write(c)
        path = store.verify_and_install(download)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == size
    assert peak < 8 * 1024 * KIB, f"peak {peak} bytes for a {size}-byte artefact"


# ---- versions, activation, pruning, failures ------------------------------------------------------


def test_activate_sets_active_and_previous_and_survives_a_restart(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    install(store, "1")
    install(store, "2")
    assert store.active("digits") is None and store.previous("digits") is None
    store.activate("digits", "1")
    store.activate("digits", "2")
    assert (store.active("digits"), store.previous("digits")) == ("2", "1")
    again = store_at(tmp_path)
    assert (again.active("digits"), again.previous("digits")) == ("2", "1")
    with pytest.raises(StoreError, match="not installed"):
        again.activate("digits", "9")
    again.activate("digits", "1")  # roll back
    assert (again.active("digits"), again.previous("digits")) == ("1", "2")


def test_records_live_in_the_device_state_and_an_earlier_release_s_file_is_taken_in(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    install(store, "1")
    install(store, "2")
    store.activate("digits", "2")
    assert (tmp_path / "state.json").is_file() and not (tmp_path / "digits" / "state.json").exists()
    # A store an earlier release left: the record in its own file beside the versions.
    store.state.forget_model("digits")
    legacy = {"active": "1", "history": ["2"], "installed": ["1", "2"], "failed": {"3": "validation: bad"}}
    (tmp_path / "digits" / "state.json").write_text(json.dumps(legacy))
    again = store_at(tmp_path)
    assert (again.active("digits"), again.previous("digits")) == ("1", "2")
    assert again.failed_reason("digits", "3") == "validation: bad"
    assert not (tmp_path / "digits" / "state.json").exists()  # taken in once, then gone
    assert store_at(tmp_path).active("digits") == "1"


def test_activating_in_turn_keeps_the_newest_versions(tmp_path: Path) -> None:
    store = store_at(tmp_path, keep_versions=3)
    for v in "12345":
        install(store, v)
        store.activate("digits", v)
    assert store.installed("digits") == ["3", "4", "5"]
    assert (store.active("digits"), store.previous("digits")) == ("5", "4")
    assert not (tmp_path / "digits" / "1").exists() and not (tmp_path / "digits" / "2").exists()


def test_pruning_spares_the_active_and_previous_versions_however_old(tmp_path: Path) -> None:
    store = store_at(tmp_path, keep_versions=3)
    for v in "12345":
        install(store, v)
    assert store.installed("digits") == ["1", "2", "3", "4", "5"]
    store.activate("digits", "2")
    assert store.installed("digits") == ["2", "4", "5"]  # the oldest go, but never the active one
    store.activate("digits", "4")
    store.activate("digits", "2")
    assert (store.active("digits"), store.previous("digits")) == ("2", "4")
    install(store, "6")
    install(store, "7")
    store.activate("digits", "7")
    assert (store.active("digits"), store.previous("digits")) == ("7", "2")
    assert store.installed("digits") == ["2", "6", "7"]
    assert store.path_of("digits", "3") is None and store.manifest_of("digits", "4") is None


def test_previous_skips_versions_marked_failed(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    for v in "123":
        install(store, v)
        store.activate("digits", v)
    store.mark_failed("digits", "2", "accuracy dropped")
    assert store.previous("digits") == "1"


def test_failures_persist_across_instances_until_cleared(tmp_path: Path) -> None:
    store_at(tmp_path).mark_failed("digits", "3", "validation: output shape [1, 9]")
    again = store_at(tmp_path)
    assert again.failed_reason("digits", "3") == "validation: output shape [1, 9]"
    assert again.failed_reason("digits", "4") is None
    again.clear_failed("digits", "3")
    assert store_at(tmp_path).failed_reason("digits", "3") is None


def test_installed_version_missing_from_the_state_still_counts(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    install(store, "1")
    install(store, "2")
    store.state.forget_model("digits")  # a crash between the rename and the state write
    assert store_at(tmp_path).installed("digits") == ["1", "2"]


def test_a_corrupt_chunk_is_found_at_verification_and_only_it_is_fetched_again(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    _, manifest, chunks = artefact(10 * KIB, 4 * KIB)
    download = store.download(manifest)
    good = chunks[1]
    flipped = chunk_of("digits", "1", 1, bytes([good.data[0] ^ 1]) + good.data[1:], sha256=good.sha256)
    for chunk in (chunks[0], flipped, chunks[2]):
        download.write(chunk)
    with pytest.raises(ChunksCorrupt, match="chunk 1 is corrupt") as caught:
        store.verify_and_install(download)
    assert caught.value.indices == [1]
    assert store.meter.get("model_chunks_rejected_total", reason="checksum") == 1
    again = store.download(manifest)  # the download stays, without the corrupt chunk
    assert again.missing() == [1]
    again.write(good)
    path = store.verify_and_install(again)
    assert path.read_bytes() == b"".join(c.data for c in chunks)
