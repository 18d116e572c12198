"""Published files reach the disk before their name does: every staged file and directory is fsynced
before the rename that publishes it, and the directory holding the new name after it (a power loss must
not leave a checkpoint name over empty files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf.publish import publish_dir, publish_model_files, staging_dir, write_text_atomic

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc")


@pytest.fixture
def events(monkeypatch):
    """The ("fsync", path) and ("replace", src, dst) calls, in order."""
    seen: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recording_replace(src, dst):
        seen.append(("replace", Path(src).resolve(), Path(dst).resolve()))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return seen


def staged_model(final: Path) -> tuple[Path, list[Path]]:
    staging = staging_dir(final)
    (staging / "sub").mkdir()
    paths = [staging / "config.json", staging / "model.safetensors", staging / "sub" / "optimizer.pt"]
    for path in paths:
        path.write_text(path.name)
    return staging, [p.resolve() for p in [*paths, staging / "sub", staging]]


def first_replace(events: list[tuple]) -> int:
    return next(i for i, e in enumerate(events) if e[0] == "replace")


def synced_before(events: list[tuple], index: int) -> set[Path]:
    return {e[1] for e in events[:index] if e[0] == "fsync"}


def test_publish_dir_syncs_the_staged_tree_before_renaming_and_the_parent_after(tmp_path, events):
    final = tmp_path / "checkpoint-3"
    final.mkdir()  # replaced: the old version goes aside first
    staging, staged = staged_model(final)
    publish_dir(staging, final)
    start = first_replace(events)
    assert set(staged) <= synced_before(events, start), events
    last = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final.resolve())
    assert ("fsync", tmp_path.resolve()) in events[last + 1 :], events
    assert (final / "sub" / "optimizer.pt").read_text() == "optimizer.pt"


def test_publish_model_files_syncs_before_the_first_rename_and_the_target_after_the_last(tmp_path, events):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    staging, staged = staged_model(target)
    publish_model_files(staging, target)
    start = first_replace(events)
    assert set(staged) <= synced_before(events, start), events
    last = max(i for i, e in enumerate(events) if e[0] == "replace")
    assert ("fsync", target.resolve()) in events[last + 1 :], events
    assert (target / "config.json").read_text() == "config.json"


def test_write_text_atomic_syncs_the_text_before_renaming(tmp_path, events):
    path = tmp_path / "trainer_state.json"
    write_text_atomic(path, "{}")
    start = first_replace(events)
    tmp = events[start][1]
    assert ("fsync", tmp) in events[:start] and ("fsync", tmp_path.resolve()) in events[start + 1 :], events
    assert path.read_text() == "{}"
