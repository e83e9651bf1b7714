"""What the package ships: public names, py.typed, LICENSE, and docstrings that name only files in the repo."""

import re
import tomllib
from pathlib import Path

import sts_callback

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sts_callback"


def test_every_public_name_resolves_and_is_listed_by_dir():
    listed = dir(sts_callback)
    for name in sts_callback.__all__:
        assert getattr(sts_callback, name) is not None, name
        assert name in listed, name
    assert "__version__" in listed and "STSCallback" in listed
    assert len(set(sts_callback.__all__)) == len(sts_callback.__all__)


def test_py_typed_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["sts_callback"]


def test_license_file_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(text.splitlines()) > 190  # the full text, not a pointer to it


# Files the library writes (not files of the repo) may be named freely; repo files must exist.
OUTPUT_FILES = {"report.md"}
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|benchmarks|scripts|tests|docs|\.ci)/[\w./-]*\w\.\w+)")
DOC_FILE = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")


def test_sources_name_no_file_missing_from_the_repo():
    missing = []
    for source in sorted(PACKAGE.glob("*.py")):
        text = source.read_text(encoding="utf-8")
        for pattern in (REPO_PATH, DOC_FILE):
            for match in pattern.finditer(text):
                name = match.group(1)
                if name in OUTPUT_FILES or (ROOT / name).exists():
                    continue
                line = text.count("\n", 0, match.start()) + 1
                missing.append(f"{source.relative_to(ROOT)}:{line}: {name}")
    assert not missing, "docstrings / comments name files that are not in the repo:\n" + "\n".join(missing)
