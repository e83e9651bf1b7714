"""The report's browser test cannot be skipped without a word: scripts/install_browser.sh fails where it could
have installed Chromium and did not, and a skipped browser test is named at the end of the pytest run."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_browser.sh"
BASH = "/bin/bash"

pytestmark = pytest.mark.skipif(not Path(BASH).exists(), reason="needs /bin/bash")


def fake_bin(tmp_path, **programs):
    """A PATH holding only the given programs (name -> shell body)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in programs.items():
        path = folder / name
        path.write_text(f"#!{BASH}\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def run_script(folder):
    return subprocess.run([BASH, str(SCRIPT)], env={"PATH": str(folder)}, capture_output=True, text=True,
                          timeout=60)


def test_failed_install_as_root_fails(tmp_path):
    folder = fake_bin(tmp_path, id="echo 0", **{"apt-get": "exit 100"})
    out = run_script(folder)
    assert out.returncode != 0
    assert "chromium" in out.stderr and "error" in out.stderr


def test_install_that_leaves_no_browser_fails(tmp_path):
    folder = fake_bin(tmp_path, id="echo 0", **{"apt-get": "exit 0"})  # "succeeds" but installs nothing
    out = run_script(folder)
    assert out.returncode != 0 and "chromedriver" in out.stderr


def test_without_root_the_skip_is_announced_and_not_an_error(tmp_path):
    folder = fake_bin(tmp_path, id="echo 1000", **{"apt-get": "exit 100"})
    out = run_script(folder)
    assert out.returncode == 0 and "skipped" in out.stderr


def test_installed_browser_is_left_alone(tmp_path):
    folder = fake_bin(tmp_path, id="echo 0", chromium="exit 0", chromedriver="exit 0",
                      **{"apt-get": "echo must not run >&2; exit 100"})
    out = run_script(folder)
    assert out.returncode == 0 and "must not run" not in out.stderr


def test_skipped_browser_test_is_named_at_the_end_of_the_run(tmp_path):
    """Run the real browser test with no Chromium on PATH: the last lines of the run say it was skipped."""
    env = {**os.environ, "PATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                          "tests/test_report.py::test_report_in_headless_chromium"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    tail = "\n".join(lines[-6:])
    assert "browser test(s) skipped" in tail, out.stdout
    assert "test_report_in_headless_chromium" in tail and "headless Chromium not installed" in tail
    assert "scripts/install_browser.sh" in tail
