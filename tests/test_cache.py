"""The demo's cached model and SAE are built once, even when two processes start on a fresh cache together."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sts_callback.tools.cache import build_once

BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sts_callback.tools.cache import build_once

    folder, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(partial):
        with open(log, "a") as handle:
            handle.write("built\\n")
        partial.mkdir(parents=True)
        (partial / "weights").write_text("half")
        time.sleep(1.5)  # the other process arrives while this one is still writing
        (partial / "weights").write_text("whole")
        (partial / "done").write_text("")

    out = build_once(folder, lambda f: (f / "done").exists(), build)
    print((out / "weights").read_text())
""")


def _is_built(folder: Path) -> bool:
    return (folder / "done").exists()


def test_two_processes_on_a_fresh_cache_build_once_and_both_read_the_whole_entry(tmp_path):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "entry"), str(log)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == ["whole", "whole"]
    assert log.read_text().splitlines() == ["built"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builder.py", "builds.log", "entry", "entry.lock"]


def test_an_interrupted_build_leaves_nothing_that_passes_for_finished_and_the_next_call_rebuilds(tmp_path):
    def crash(partial: Path) -> None:
        partial.mkdir()
        (partial / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "entry", _is_built, crash)
    assert not (tmp_path / "entry").exists()
    assert not list(tmp_path.glob("entry.partial-*"))

    def build(partial: Path) -> None:
        partial.mkdir()
        (partial / "done").write_text("")

    assert _is_built(build_once(tmp_path / "entry", _is_built, build))


def test_an_unfinished_entry_left_by_an_older_version_is_replaced(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "weights").write_text("half")  # no "done": not built

    def build(partial: Path) -> None:
        partial.mkdir()
        (partial / "done").write_text("")

    folder = build_once(tmp_path / "entry", _is_built, build)
    assert _is_built(folder) and not (folder / "weights").exists()


def test_a_built_entry_is_returned_without_building(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "done").write_text("")

    def build(partial: Path) -> None:
        raise AssertionError("must not rebuild a finished entry")

    assert build_once(tmp_path / "entry", _is_built, build) == tmp_path / "entry"


def test_the_demo_sae_is_built_in_a_private_folder_and_its_report_names_the_cached_one(tmp_path, monkeypatch):
    import json

    from tiny import make_model, make_tokenizer

    from sts_callback.tools import demo

    monkeypatch.setenv("STS_CACHE", str(tmp_path))
    tokenizer = make_tokenizer()
    model = make_model(vocab_size=len(tokenizer), layers=demo.DEMO_LAYER + 1, hidden=16)
    logged = []
    path = demo.ensure_demo_sae(model, tokenizer, d_sae=32, k=4, tokens=600, log=logged.append)
    assert path == tmp_path / "sae" / f"gemma-3-270m-L{demo.DEMO_LAYER}-w32-k4"
    assert (path / "cfg.json").exists()
    assert json.loads((path / "training_report.json").read_text())["path"] == str(path.resolve())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    assert demo.ensure_demo_sae(model, tokenizer, d_sae=32, k=4, tokens=600, log=logged.append) == path
    assert logged[-1] == f"SAE: cached at {path}"


def test_the_cache_folder_is_absolute_and_an_empty_or_tilde_sts_cache_means_what_a_user_meant(tmp_path, monkeypatch):
    """STS_CACHE= (an unset variable in a .env) made the demo write about 1 GB into the current folder, and a
    quoted '~/x' created a folder named '~'."""
    from sts_callback.tools.models import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home_cache = tmp_path / "home" / ".cache" / "sts_callback"
    for empty in ("", "  "):
        monkeypatch.setenv("STS_CACHE", empty)
        assert default_cache_dir() == home_cache
    monkeypatch.setenv("STS_CACHE", "~/team")
    assert default_cache_dir() == tmp_path / "home" / "team"
    monkeypatch.setenv("STS_CACHE", "rel/cache")  # the folder of the call, kept when a later chdir happens
    assert default_cache_dir() == tmp_path / "rel" / "cache"
    monkeypatch.delenv("STS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sts_callback"
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "explicit"))  # STS_CACHE wins over XDG_CACHE_HOME
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("STS_CACHE")
    for ignored in ("", "relative/xdg"):  # the XDG spec: a relative path is invalid and ignored
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert default_cache_dir() == home_cache


KILLED_BUILDER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sts_callback.tools.cache import build_once

    def build(partial):
        partial.mkdir(parents=True)
        (partial / "weights").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does: no `finally` runs

    build_once(Path(sys.argv[1]), lambda f: (f / "done").exists(), build)
""")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="SIGKILL is POSIX")
def test_the_partial_folder_of_a_killed_build_is_removed_by_the_next_build(tmp_path):
    """A build killed by SIGKILL / the OOM killer left its `<entry>.partial-<PID>` folder (1 GB for Gemma) forever."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_BUILDER)
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(script), str(cache / "entry")], capture_output=True, timeout=120)
    assert proc.returncode != 0
    left = [p.name for p in cache.glob("entry.partial-*")]
    assert len(left) == 1 and left[0].removeprefix("entry.partial-").isdigit()  # what the killed build left
    (cache / "entry.partial-notes").mkdir()  # not a builder's name: left alone
    (cache / "entry2.partial-1").mkdir()  # another entry's: left alone

    def build(partial: Path) -> None:
        partial.mkdir()
        (partial / "done").write_text("")

    assert _is_built(build_once(cache / "entry", _is_built, build))
    assert sorted(p.name for p in cache.iterdir()) == ["entry", "entry.lock", "entry.partial-notes",
                                                       "entry2.partial-1"]



@pytest.fixture
def umask_022():
    import os

    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_built_entry_gets_the_umasks_modes_so_a_shared_cache_can_be_read_by_others(tmp_path, umask_022):
    """safetensors writes 0600: a cache shared by a team (STS_CACHE) failed for everyone but its builder."""
    import os
    import stat

    def build(partial: Path) -> None:
        (partial / "sub").mkdir(parents=True, mode=0o700)
        os.close(os.open(partial / "sub" / "weights", os.O_WRONLY | os.O_CREAT, 0o600))
        (partial / "done").write_text("")

    folder = build_once(tmp_path / "entry", _is_built, build)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [folder, *folder.rglob("*")]}
    assert modes == {"entry": 0o755, "entry/sub": 0o755, "entry/sub/weights": 0o644, "entry/done": 0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]  # no probe left behind


def test_a_cached_model_file_this_user_cannot_read_is_named_before_loading(tmp_path, monkeypatch):
    import os

    from tiny import make_model, make_tokenizer

    from sts_callback.core.errors import STSInputError
    from sts_callback.tools.models import GEMMA3_270M, load_gemma3_270m

    folder = tmp_path / GEMMA3_270M  # a tiny model stands in for the cached Gemma
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    weights = folder / "model.safetensors"
    access = os.access  # denied for the weights: root, running the tests, may read any file
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != weights and access(path, mode, **kw))
    with pytest.raises(STSInputError, match="lacks read permission") as caught:
        load_gemma3_270m(tmp_path)
    assert str(weights) in str(caught.value)


def test_a_damaged_cached_model_names_the_entry_to_delete(tmp_path):
    """A cached model.safetensors cut short (a full disk) failed with safetensors' traceback."""
    from tiny import make_model, make_tokenizer

    from sts_callback.core.errors import STSInputError
    from sts_callback.tools.models import GEMMA3_270M, load_gemma3_270m

    folder = tmp_path / GEMMA3_270M  # a tiny model stands in for the cached Gemma
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(STSInputError, match="the cache entry is damaged") as caught:
        load_gemma3_270m(tmp_path)
    assert f"Delete {folder} and the next run rebuilds it" in str(caught.value)


def test_a_cache_folder_that_cannot_be_written_is_named_and_other_errors_pass(tmp_path):
    from sts_callback.core.errors import STSInputError

    (tmp_path / "afile").write_text("")

    def build(partial: Path) -> None:
        partial.mkdir()
        (partial / "done").write_text("")

    with pytest.raises(STSInputError, match="STS_CACHE"):
        build_once(tmp_path / "afile" / "sae" / "entry", _is_built, build)

    def read_a_missing_input(partial: Path) -> None:
        (tmp_path / "no-such-input").read_text()

    with pytest.raises(FileNotFoundError):  # not the cache's fault: the error as it was
        build_once(tmp_path / "cache" / "entry", _is_built, read_a_missing_input)
