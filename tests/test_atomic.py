"""core/atomic.py: what an atomic write does to the node already at the path, and the mode it leaves."""

import json
import os
import stat
import time

import pytest

from sts_callback.core.atomic import (append_json_line, atomic_write, atomic_write_json, atomic_write_text,
                                      output_target)
from sts_callback.core.errors import STSInputError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs, device nodes and umask are POSIX")


def private_null(folder):
    """A private copy of /dev/null (char 1,3): never point a write at the real one (as root it would be replaced)."""
    path = folder / "mynull"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        return None  # mknod needs root (CAP_MKNOD)
    return path


def special_nodes(folder):
    """(path, what the error calls it) for a FIFO, a folder and, as root, a character device."""
    fifo = folder / "myfifo"
    os.mkfifo(fifo)
    (folder / "adir").mkdir()
    nodes = [(fifo, "FIFO"), (folder / "adir", "folder")]
    null = private_null(folder)
    if null is not None:
        nodes.append((null, "character device"))
    return nodes


def node_kind(path):
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("write", [lambda p: atomic_write_text(p, "x"), lambda p: atomic_write_json(p, {"a": 1})],
                         ids=["text", "json"])
def test_atomic_writes_refuse_a_device_fifo_or_folder_and_leave_it_alone(tmp_path, write):
    for path, kind in special_nodes(tmp_path):
        before = node_kind(path)
        with pytest.raises(STSInputError, match=kind) as info:
            write(path)
        assert str(path) in str(info.value) and ("regular file" in str(info.value) or "file path" in str(info.value))
        assert node_kind(path) == before  # still the FIFO / device / folder it was
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_append_refuses_a_fifo_or_device(tmp_path):
    fifo = tmp_path / "myfifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that an unchecked open cannot block
    try:
        targets = [fifo] + [p for p in [private_null(tmp_path)] if p is not None]
        for path in targets:
            with pytest.raises(STSInputError, match="not a regular file|FIFO|device"):
                append_json_line(path, {"step": 1})
        assert os.read(reader, 10) == b""  # nothing went into the pipe (and no writer holds it)
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_link_is_written_through_and_kept(tmp_path):
    real = tmp_path / "data" / "forecast.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "forecast.json"
    link.symlink_to(real)
    assert atomic_write_json(link, {"new": True}) == link
    assert link.is_symlink() and json.loads(real.read_text()) == {"new": True}
    append_json_line(link, {"step": 2})  # appends go through the link as well
    assert real.read_text().endswith('{"step": 2}\n') and link.is_symlink()
    assert sorted(p.name for p in real.parent.iterdir()) == ["forecast.json"]  # no temporary file left
    # a dangling link: its target is created
    dangling = tmp_path / "later.json"
    dangling.symlink_to(tmp_path / "data" / "later.json")
    atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "data" / "later.json").read_text() == "made"
    # a link to a FIFO is refused, naming both; a link that loops is refused
    os.mkfifo(tmp_path / "myfifo")
    (tmp_path / "to_fifo").symlink_to(tmp_path / "myfifo")
    with pytest.raises(STSInputError, match="a link to .*myfifo.*FIFO"):
        atomic_write_text(tmp_path / "to_fifo", "x")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    with pytest.raises(STSInputError, match="loops"):
        atomic_write_text(tmp_path / "loop_a", "x")
    assert output_target(tmp_path / "new.json") == (tmp_path / "new.json", None)


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def safetensors_file(path):
    import torch
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))  # as the monitor state is saved


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_new_file_gets_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    for name, write in (("a.json", lambda p: atomic_write_json(p, [1])), ("b.txt", lambda p: atomic_write_text(p, "")),
                        ("c.jsonl", lambda p: append_json_line(p, {"x": 1})),
                        ("d.safetensors", safetensors_file)):  # safetensors makes its own file, 0600
        write(tmp_path / name)
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name


def test_an_overwritten_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    for mode in (0o640, 0o600, 0o666, 0o444):
        path = tmp_path / f"kept_{mode:o}.json"
        path.write_text("old")
        path.chmod(mode)
        atomic_write_json(path, {"new": mode})
        assert stat.S_IMODE(os.stat(path).st_mode) == mode and json.loads(path.read_text()) == {"new": mode}
    # a private file is never readable by others while it is rewritten (the temporary file included)
    private = tmp_path / "private.json"
    private.write_text("secret")
    private.chmod(0o600)
    seen = []
    atomic_write(private, lambda tmp: (seen.append(stat.S_IMODE(os.stat(tmp).st_mode)), tmp.write_text("new")))
    assert seen == [0o600] and stat.S_IMODE(os.stat(private).st_mode) == 0o600
    # through a link: the file pointed at keeps its mode
    real = tmp_path / "kept_640.json"
    (tmp_path / "link.json").symlink_to(real)
    atomic_write_text(tmp_path / "link.json", "via link")
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640 and real.read_text() == "via link"


def test_a_temporary_left_by_a_process_killed_mid_write_is_removed_by_the_next_write(tmp_path):
    """SIGTERM or SIGKILL during a write runs no cleanup: its hidden temporary stays until the file is written again
    (then, once it is older than any write takes); another writer's fresh temporary is left alone."""
    import subprocess
    import sys

    from sts_callback.core import atomic

    target = tmp_path / "callback_state.json"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from sts_callback.core.atomic import atomic_write\n"
        f"atomic_write({str(target)!r}, lambda tmp: (tmp.write_text('half'), print('writing', flush=True), "
        "time.sleep(60)))")], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "writing"
    killed.kill()
    killed.wait()
    left = list(tmp_path.glob(".callback_state.json.*.tmp"))
    assert len(left) == 1 and not target.exists()
    fresh = tmp_path / ".callback_state.json.0000beef.tmp"
    fresh.write_text("another writer's")
    old = time.time() - atomic.STALE_TEMPORARY_SECONDS - 60
    os.utime(left[0], (old, old))
    atomic.atomic_write_json(target, {"step": 1})
    assert not left[0].exists() and fresh.exists() and json.loads(target.read_text()) == {"step": 1}
