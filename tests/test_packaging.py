"""What the package ships: public names, py.typed, LICENSE, and docstrings that name only files in the repo."""

import re
import subprocess
import sys

try:
    import tomllib  # novermin (the fallback below is 3.10's)
except ModuleNotFoundError:  # Python 3.10; pytest itself depends on tomli there
    import tomli as tomllib
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


# --------------------------------------------------------------------------- dependencies and optional extras
IMPORT_NAMES = {"yaml": "pyyaml", "sae_lens": "sae-lens"}  # import name -> distribution name, where they differ


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_module_level_imports_are_core_dependencies():
    """A third-party import at the top of a module runs on `import sts_callback...`: it must be a core dependency.
    What only one layer needs (matplotlib for the report's figures) is an extra, imported where it is used."""
    import ast
    import sys

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = _requirement_names(pyproject["project"]["dependencies"])
    outside = []
    for source in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                if IMPORT_NAMES.get(top, top).lower() not in core:
                    outside.append(f"{source.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not outside, "module-level imports of packages that are no core dependency:\n" + "\n".join(outside)


def test_matplotlib_is_the_report_extra_and_dev_installs_every_extra():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = {name: _requirement_names(reqs) for name, reqs in pyproject["project"]["optional-dependencies"].items()}
    assert "matplotlib" not in _requirement_names(pyproject["project"]["dependencies"])
    assert "matplotlib" in extras["report"] and "matplotlib" in extras["demo"]  # the demo writes a report
    everything = set().union(*(reqs for name, reqs in extras.items() if name != "dev"))
    assert everything <= extras["dev"], f"dev lacks {sorted(everything - extras['dev'])}"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'-e "\.\[dev[^"]*\]"', setup)  # make test / a fresh clone get everything


def test_importing_the_package_and_the_callback_loads_no_matplotlib():
    import subprocess
    import sys

    code = ("import sys, sts_callback, sts_callback.integrations.callback, sts_callback.reporting.report, "
            "sts_callback.validation.validate; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_code_needs_no_newer_python_than_declared():
    # CI runs one Python (3.11); a 3.11-only module or syntax would break every 3.10 user at import.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = declared.removeprefix(">=")
    result = subprocess.run([str(Path(sys.executable).with_name("vermin")), f"-t={minimum}-", "--no-tips", "--eval-annotations",
                             "--violations", "sts_callback", "benchmarks", "examples", "tests"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
