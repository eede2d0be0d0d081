"""Atomic writes: the target is replaced whole or not at all, with the user's umask applied
by the kernel — the process umask (shared by all threads) is never changed, not even briefly."""

import os
import stat

import pytest

from robalign._io import write_atomic


def test_never_touches_the_process_umask(tmp_path, monkeypatch):
    def no_umask(*_):
        raise AssertionError("os.umask changes the umask of every thread")

    monkeypatch.setattr(os, "umask", no_umask)
    write_atomic(tmp_path / "a.json", lambda h: h.write(b"{}"))
    assert (tmp_path / "a.json").read_bytes() == b"{}"


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "b.txt", lambda h: h.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "c.txt"
    target.write_text("old")

    def half(handle):
        handle.write(b"new but not")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, half)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["c.txt"]
