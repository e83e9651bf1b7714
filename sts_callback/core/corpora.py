"""Named text domains read from files that are already on disk, so demos and benchmarks run offline.

Every built-in domain is real human-written text taken from the Python standard library or from
packages the library depends on; nothing is generated and nothing is downloaded:

- ``python_code``: function- and class-sized blocks of the standard library's Python source
  (tests, encodings tables and blocks that are mostly comments or docstrings left out).
- ``cpp_code``: C/C++ from the headers torch bundles under ``torch/include`` (generated headers
  such as ``ATen/ops`` left out) and CPython's own headers (``sys.base_prefix``'s include dir).
- ``python_reference``: the Python language reference as shipped in ``pydoc_data/topics.py``:
  English prose in paragraphs, with its indented grammar rules and code samples.
- ``legal``: license texts: ``LICENSE``/``COPYING``/``NOTICE`` files of every installed
  ``*.dist-info``, ``/usr/share/common-licenses`` where present and CPython's ``LICENSE.txt``;
  each distinct paragraph kept once.
- ``math``: docstrings of sympy, ``scipy.special`` and ``scipy.stats`` (definitions, formulas,
  parameter descriptions), examples and references left out.
- ``ml_docs``: docstrings of public classes and functions of transformers, trl, peft and
  accelerate, code examples left out.
- ``readme_prose``: package READMEs, the long descriptions in ``*.dist-info/METADATA``, up to
  their changelog (code blocks, badges and tables left out).
- ``changelog``: release notes: the changelog part of ``*.dist-info/METADATA``, IDLE's
  ``NEWS.txt``/``NEWS2x.txt``/``HISTORY.txt`` and numpy's ``ma/API_CHANGES.txt``.
- ``nlp_tutorials``: NLTK's ``nltk/test/*.doctest`` tutorials, English explanation interleaved
  with ``>>>`` sessions.
- ``chat_templates``: Jinja chat templates of chat models shipped in ``trl/chat_templates``.
- ``markup``: HTML and XML: IDLE's HTML help page (``idlelib/help.html``), sympy's MathML XSLT
  stylesheets and matplotlib's web-backend pages.

Source files are read as text (``errors="ignore"``); Python sources are parsed with ``ast``, never
imported. File lists are sorted and subsampled at even strides, so a domain's texts are the same
on every call with the same installed versions. Texts are 200-2000 characters, de-duplicated, at
most 3000 per domain: prose (reference, legal, READMEs, changelogs) with whitespace collapsed and
paragraphs separated by one blank line; code, markup and docstrings with their line breaks and
relative indentation kept, trailing spaces and repeated blank lines removed. Results are cached
in-process; ``clear_cache()`` empties the cache.

Other domains can be added with ``register_domain(name, loader, description)``.
"""

from __future__ import annotations

import ast
import email.parser
import email.policy
import functools
import importlib.util
import inspect
import os
import re
import site
import sys
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import STSInputError

MIN_CHARS = 200
MAX_CHARS = 2000
MAX_TEXTS_PER_DOMAIN = 3000
TARGET_CHARS = 1000  # consecutive paragraphs/blocks are joined up to about this length


class _SourceMissing(Exception):
    """A built-in domain's source files are not on this machine."""


@dataclass(frozen=True)
class _Domain:
    loader: Callable[[], list[str]]
    description: str
    provider: str | None  # what to install when the source files are missing; None: user domain


_DOMAINS: dict[str, _Domain] = {}


# ----------------------------------------------------------------------------------------------
# public API


def available_domains() -> dict[str, str]:
    """Names of the known domains (built-in and registered) mapped to a one-line description."""
    return {name: domain.description for name, domain in _DOMAINS.items()}


def load_domain(name: str, max_texts: int | None = None) -> list[str]:
    """The texts of domain ``name``; ``max_texts`` keeps that many, spread evenly over the domain.

    Raises:
        STSInputError: unknown name, missing source files, or a loader that returns no texts.
    """
    if name not in _DOMAINS:
        raise STSInputError(
            f"unknown text domain {name!r}; available domains: {', '.join(sorted(_DOMAINS))}. "
            "Register your own with sts_callback.core.corpora.register_domain(name, loader)."
        )
    if max_texts is not None and (isinstance(max_texts, bool) or not isinstance(max_texts, int)
                                  or max_texts < 1):
        raise STSInputError(f"max_texts must be a positive int or None, got {max_texts!r}.")
    texts = _cached_texts(name)
    return _spread(texts, max_texts) if max_texts is not None else list(texts)


def register_domain(
    name: str, loader: Callable[[], list[str]], description: str = "", *, overwrite: bool = False
) -> None:
    """Make ``load_domain(name)`` return ``loader()`` (called once, then cached).

    The loader's texts are kept as given, except that empty strings and exact duplicates are
    dropped. A name already taken raises STSInputError unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise STSInputError(f"domain name must be a non-empty string, got {name!r}.")
    if not callable(loader):
        raise STSInputError(f"loader of domain {name!r} must be callable, got {type(loader).__name__}.")
    if name in _DOMAINS and not overwrite:
        raise STSInputError(
            f"domain {name!r} already exists; pass overwrite=True to replace it."
        )
    _DOMAINS[name] = _Domain(loader, description or f"user-registered domain {name!r}", None)
    _cached_texts.cache_clear()


def clear_cache() -> None:
    """Forget loaded texts, so the next ``load_domain`` reads the source files again."""
    _cached_texts.cache_clear()


@functools.lru_cache(maxsize=None)
def _cached_texts(name: str) -> tuple[str, ...]:
    domain = _DOMAINS[name]
    try:
        raw = domain.loader()
    except _SourceMissing as missing:
        raise STSInputError(
            f"text domain {name!r} reads files of {domain.provider}, which are not on this "
            f"machine ({missing}); install {domain.provider} or pick another domain."
        ) from None
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
        raise STSInputError(f"loader of domain {name!r} must return a list of strings.")
    raw = list(raw)
    if not all(isinstance(text, str) for text in raw):
        raise STSInputError(f"loader of domain {name!r} returned non-string items.")
    if domain.provider is None:
        texts = _unique(text for text in raw if text.strip())
    else:
        texts = _unique(text for text in raw if MIN_CHARS <= len(text) <= MAX_CHARS)
        texts = _spread(texts, MAX_TEXTS_PER_DOMAIN)
    if not texts:
        raise STSInputError(f"text domain {name!r} produced no texts on this machine.")
    return tuple(texts)


def _builtin(name: str, description: str, provider: str):
    def register(loader: Callable[[], list[str]]) -> Callable[[], list[str]]:
        _DOMAINS[name] = _Domain(loader, description, provider)
        return loader

    return register


# ----------------------------------------------------------------------------------------------
# finding and reading files


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_dirs() -> list[Path]:
    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    candidates += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    resolved = {Path(p).resolve() for p in candidates if Path(p).is_dir()}
    return sorted(resolved)


def _package_dir(package: str) -> Path:
    """Directory of an installed top-level package, located without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _SourceMissing(f"package {package!r} not found")
    return Path(next(iter(spec.submodule_search_locations)))


def _optional_package_dir(package: str) -> Path | None:
    try:
        return _package_dir(package)
    except _SourceMissing:
        return None


def _files_under(root: Path, suffixes: tuple[str, ...], skip_dirs: Iterable[str] = ()) -> list[Path]:
    skip = set(skip_dirs) | {"__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found += [Path(dirpath, f) for f in filenames if f.endswith(suffixes)]
    return sorted(found)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _dist_info_dirs() -> list[Path]:
    dirs: dict[str, Path] = {}
    for site_dir in _site_dirs():
        for entry in sorted(site_dir.glob("*.dist-info")):
            dirs.setdefault(entry.name.lower(), entry)
    return [dirs[key] for key in sorted(dirs)]


def _parse_python(source: str) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes etc. in third-party sources
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError):
            return None


# ----------------------------------------------------------------------------------------------
# shaping texts


def _spread(items: Sequence[str], count: int) -> list[str]:
    """``count`` items at even strides over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _prose(text: str) -> str:
    return " ".join(text.split())


def _tidy_code(text: str) -> str:
    """Trailing spaces and repeated blank lines removed, common indentation removed."""
    lines: list[str] = []
    for line in text.split("\n"):
        line = line.rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip("\n")


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _split_to_limit(units: Iterable[str], joiner: str, limit: int) -> list[str]:
    """Join consecutive units into pieces of at most ``limit`` characters (longer units dropped)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        if len(unit) > limit:
            continue
        added = len(unit) + (len(joiner) if current else 0)
        if current and size + added > limit:
            pieces.append(joiner.join(current))
            current, size, added = [], 0, len(unit)
        current.append(unit)
        size += added
    if current:
        pieces.append(joiner.join(current))
    return pieces


def _split_prose(paragraph: str, limit: int = TARGET_CHARS) -> list[str]:
    if len(paragraph) <= MAX_CHARS:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    if any(len(s) > limit for s in sentences):
        sentences = [w for s in sentences for w in _split_to_limit(s.split(" "), " ", limit)]
    return _split_to_limit(sentences, " ", limit)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_code(block: str, limit: int = TARGET_CHARS) -> list[str]:
    """A block too long for one text, cut before its least indented lines, else between lines."""
    if len(block) <= MAX_CHARS:
        return [block]
    lines = block.split("\n")
    outer = min(_indent(line) for line in lines if line.strip())
    segments: list[list[str]] = []
    for line in lines:
        if not segments or (line.strip() and _indent(line) == outer):
            segments.append([])
        segments[-1].append(line)
    units = []
    for segment in segments:
        joined = "\n".join(segment)
        units += [joined] if len(joined) <= limit else segment
    return _split_to_limit(units, "\n", limit)


def _pack(pieces: Iterable[str], joiner: str, target: int = TARGET_CHARS) -> list[str]:
    """Join consecutive pieces into texts of MIN_CHARS..MAX_CHARS characters, about ``target`` long.

    Pieces longer than MAX_CHARS are dropped; split them first.
    """
    texts: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        text = joiner.join(current)
        if len(text) >= MIN_CHARS:
            texts.append(text)
        elif texts and len(texts[-1]) + len(joiner) + len(text) <= MAX_CHARS:
            texts[-1] = texts[-1] + joiner + text  # a short tail joins the text before it

    for piece in pieces:
        if not piece or len(piece) > MAX_CHARS:
            continue
        added = len(piece) + (len(joiner) if current else 0)
        if current and size + added > target and (size >= MIN_CHARS or size + added > MAX_CHARS):
            flush()
            current, size, added = [], 0, len(piece)
        current.append(piece)
        size += added
    if current:
        flush()
    return texts


def _pack_code(text: str, target: int = TARGET_CHARS) -> list[str]:
    """Code or markup cut at blank lines into texts of about ``target`` characters."""
    blocks = ["\n".join(line.rstrip() for line in b.split("\n")).strip("\n") for b in _paragraphs(text)]
    pieces = [piece for block in blocks if block for piece in _split_code(block, target)]
    return [_tidy_code(t) for t in _pack(pieces, "\n\n", target)]


def _per_source(texts: list[str], cap: int) -> list[str]:
    """At most ``cap`` texts of one source file, spread over the file."""
    return _spread(texts, cap)


_UNDERLINE = re.compile(r"^\s*([=\-~^*#+_`.:'\"])\1{2,}\s*$")
_FENCE = re.compile(r"^\s*`{3,}\s*[\w+.-]*\s*$")  # opens or closes a Markdown code block


# ----------------------------------------------------------------------------------------------
# docstrings (math, ml_docs)

_DROPPED_SECTIONS = re.compile(
    r"^(examples?|example usage|usage example|see also|references?|reference|citation)\s*:?$",
    re.IGNORECASE,
)
_SECTION_HEADING = re.compile(r"^[A-Z][A-Za-z ]{1,40}:?$")


def _docstring_paragraphs(doc: str) -> list[str]:
    """Paragraphs of a docstring, line breaks kept, without examples, code, references, see-also."""
    doc = re.sub(r"%\(\w+\)s", "", doc)  # scipy.stats docstring templates
    lines = doc.split("\n")
    kept: list[str] = []
    dropping = in_fence = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        is_rst_heading = bool(_UNDERLINE.match(next_line)) and stripped and not line[:1].isspace()
        is_google_heading = bool(_SECTION_HEADING.match(stripped)) and stripped.endswith(":") \
            and not line[:1].isspace()
        if is_rst_heading or is_google_heading:
            dropping = bool(_DROPPED_SECTIONS.match(stripped))
        elif stripped.startswith(".. ") and any(k in stripped for k in ("plot::", "code-block::",
                                                                         "testcode::", "doctest::")):
            dropping = True
        if not dropping:
            kept.append(line.rstrip())
    paragraphs = []
    for paragraph in _paragraphs("\n".join(kept)):
        if re.search(r"^\s*(>>>|\.\.\.|\$ )", paragraph, re.MULTILINE):
            continue
        words = "".join(line for line in paragraph.split("\n") if not _UNDERLINE.match(line))
        if sum(map(str.isalpha, words)) >= 0.3 * len(words.strip()):  # keeps LaTeX, drops tables
            paragraphs.extend(_split_code(paragraph.strip("\n")))
    return paragraphs


def _docstrings(tree: ast.Module, public_only: bool) -> list[str]:
    """Docstrings of the module, its classes and functions, and of ``add_newdoc(...)`` calls.

    Only statement bodies are visited (not every expression node), which keeps this cheap.
    """
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        name = getattr(node, "name", "")
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and not (public_only and name.startswith("_") and name != "__init__"):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
        for field in ("body", "orelse", "finalbody"):
            for child in getattr(node, field, ()):
                if isinstance(child, ast.Expr) and isinstance(child.value, ast.Call):
                    call = child.value
                    func = call.func
                    func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    last = call.args[-1] if call.args else None
                    if func_name.endswith("add_newdoc") and isinstance(last, ast.Constant) \
                            and isinstance(last.value, str):
                        found.append(inspect.cleandoc(last.value))
                elif isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef,
                                        ast.If, ast.Try, ast.With)):
                    visit(child)
        for handler in getattr(node, "handlers", ()):
            visit(handler)

    visit(tree)
    return found


def _docstring_texts(files: Sequence[Path], public_only: bool, per_file: int) -> list[str]:
    texts: list[str] = []
    for path in files:
        tree = _parse_python(_read(path))
        if tree is None:
            continue
        file_texts = []
        for doc in _docstrings(tree, public_only):
            file_texts += [_tidy_code(t) for t in _pack(_docstring_paragraphs(doc), "\n\n")]
        texts += _per_source(_unique(file_texts), per_file)
    return texts


def _python_sources(root: Path, skip_dirs: Iterable[str] = (), max_bytes: int = 250_000) -> list[Path]:
    """Library sources under ``root``: no tests, no ``__init__.py``, none over ``max_bytes``.

    The size limit keeps parsing time bounded; the few huge modules are mostly code.
    """
    skip = {"tests", "test", "testing", "benchmarks", *skip_dirs}
    return [p for p in _files_under(root, (".py",), skip)
            if not p.name.startswith(("test_", "conftest")) and p.name != "__init__.py"
            and p.stat().st_size <= max_bytes]


# ----------------------------------------------------------------------------------------------
# built-in domains


def _mostly_code(node: ast.AST, lines: list[str], start: int) -> bool:
    """At least half of a block's characters are code, not comments or its docstring."""
    body = getattr(node, "body", [])
    doc_lines: set[int] = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc_lines = set(range(body[0].lineno, body[0].end_lineno + 1))
    total = code = 0
    for number in range(start, node.end_lineno + 1):
        stripped = lines[number - 1].strip()
        total += len(stripped)
        if stripped and not stripped.startswith("#") and number not in doc_lines:
            code += len(stripped)
    return total > 0 and code >= 0.5 * total


def _code_blocks(node: ast.AST, lines: list[str]) -> Iterable[str]:
    """The node's source if it fits in one text, else the blocks of its methods."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    source = "\n".join(lines[start - 1:node.end_lineno])
    if len(source) <= MAX_CHARS:
        if not getattr(node, "name", "").startswith("test") and _mostly_code(node, lines, start):
            yield _tidy_code(source)
    elif isinstance(node, ast.ClassDef):
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from _code_blocks(child, lines)


@_builtin("python_code", "Python source: functions and classes of the standard library",
          "the Python standard library")
def _load_python_code() -> list[str]:
    root = _stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
            "pydoc_data", "lib2to3", "ensurepip"}
    files = [p for p in _python_sources(root, skip, max_bytes=120_000)
             if not p.name.startswith("_sysconfigdata") and not p.parent.name.startswith("config-")]
    if not files:
        raise _SourceMissing(f"no Python sources under {root}")
    texts: list[str] = []
    for path in _spread(files, 180):
        source = _read(path)
        tree = _parse_python(source)
        if tree is None:
            continue
        lines = source.split("\n")
        blocks = [block for node in tree.body
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  for block in _code_blocks(node, lines)]
        texts += _per_source(blocks, 8)
    return texts


_PREPROCESSOR_ONLY = re.compile(r"^\s*#\s*(include|pragma|if|ifdef|ifndef|endif|else|elif|undef)\b")
_GENERATED_MARKERS = ("@generated", "autogenerated", "auto-generated", "generated by",
                      "do not edit")


def _mostly_c_code(chunk: str) -> bool:
    total = code = 0
    in_comment = False
    for line in chunk.split("\n"):
        stripped = line.strip()
        total += len(stripped)
        is_comment = in_comment or stripped.startswith(("//", "/*", "*"))
        if "/*" in stripped and "*/" not in stripped:
            in_comment = True
        if "*/" in stripped:
            in_comment = False
        if stripped and not is_comment and not _PREPROCESSOR_ONLY.match(stripped):
            code += len(stripped)
    return total > 0 and code >= 0.5 * total and (";" in chunk or "{" in chunk)


def _strip_leading_comment(source: str) -> str:
    """Drop the license/banner comment at the top of a C/C++ file."""
    stripped = source.lstrip()
    if stripped.startswith("/*") and "*/" in stripped:
        return stripped[stripped.index("*/") + 2:]
    lines = stripped.split("\n")
    while lines and lines[0].lstrip().startswith("//"):
        lines.pop(0)
    return "\n".join(lines)


@_builtin("cpp_code", "C/C++ headers: torch's bundled headers (c10, ATen, pybind11, ...) and CPython's",
          "torch")
def _load_cpp_code() -> list[str]:
    torch_include = _package_dir("torch") / "include"
    if not torch_include.is_dir():
        raise _SourceMissing(f"{torch_include} does not exist")
    torch_headers = [p for p in _files_under(torch_include, (".h", ".hpp", ".cuh"),
                                             {"ops", "test", "tests"})
                     if not p.name.endswith(".pb.h")]
    python_include = Path(sys.base_prefix, "include", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    python_headers = _files_under(python_include, (".h",)) if python_include.is_dir() else []
    texts: list[str] = []
    for path in _spread(torch_headers, 700) + python_headers:
        source = _read(path)
        head = source[:3000].lower()
        if any(marker in head for marker in _GENERATED_MARKERS):
            continue
        chunks = [c for c in _pack_code(_strip_leading_comment(source)) if _mostly_c_code(c)]
        texts += _per_source(chunks, 4)
    return texts


@_builtin("python_reference",
          "The Python language reference (pydoc topics): English prose with grammar rules and examples",
          "the Python standard library (pydoc_data)")
def _load_python_reference() -> list[str]:
    path = _stdlib_dir() / "pydoc_data" / "topics.py"
    tree = _parse_python(_read(path)) if path.is_file() else None
    topics: dict[str, str] = {}
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
    if not topics:
        raise _SourceMissing(f"{path} is missing or holds no topics")
    texts: list[str] = []
    for topic in sorted(topics):
        pieces = []
        for paragraph in _paragraphs(topics[topic]):
            lines = [line.rstrip() for line in paragraph.split("\n") if not _UNDERLINE.match(line)]
            if not lines:
                continue
            if all(line[:1] == " " for line in lines):  # grammar rules and code samples keep their lines
                pieces += _split_code("\n".join(lines))
            else:
                pieces += _split_prose(_prose("\n".join(lines)))
        texts += _pack(pieces, "\n\n")
    return texts


_LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice|copyright|third[-_]party)", re.IGNORECASE)


def _license_files() -> list[Path]:
    files: list[Path] = []
    for dist_info in _dist_info_dirs():
        files += [p for p in sorted(dist_info.rglob("*")) if p.is_file() and _LICENSE_NAME.match(p.name)]
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        files += sorted(p for p in common.iterdir() if p.is_file())
    stdlib_license = _stdlib_dir() / "LICENSE.txt"
    if stdlib_license.is_file():
        files.append(stdlib_license)
    return files


@_builtin("legal", "License texts (MIT, BSD, Apache, GPL, PSF, ...) of installed packages",
          "installed packages' *.dist-info license files")
def _load_legal() -> list[str]:
    files = _license_files()
    if not files:
        raise _SourceMissing("no license files in *.dist-info or /usr/share/common-licenses")
    seen_paragraphs: set[str] = set()
    seen_files: set[Path] = set()
    texts: list[str] = []
    for path in files:
        real = path.resolve()
        if real in seen_files:
            continue
        seen_files.add(real)
        pieces = []
        for paragraph in _paragraphs(_read(path)):
            lines = [line for line in paragraph.split("\n") if not _UNDERLINE.match(line)]
            text = _prose("\n".join(lines))
            if sum(map(str.isalpha, text)) < 0.5 * len(text) or text.lower() in seen_paragraphs:
                continue
            seen_paragraphs.add(text.lower())
            pieces += _split_prose(text)
        texts += _pack(pieces, "\n\n")
    return texts


@_builtin("math", "Mathematical docstrings of sympy, scipy.special and scipy.stats",
          "sympy or scipy")
def _load_math() -> list[str]:
    sympy_dir = _optional_package_dir("sympy")
    scipy_dir = _optional_package_dir("scipy")
    if sympy_dir is None and scipy_dir is None:
        raise _SourceMissing("neither sympy nor scipy is installed")
    files: list[Path] = []
    if scipy_dir is not None:
        files += _python_sources(scipy_dir / "special") + _spread(_python_sources(scipy_dir / "stats"), 30)
    if sympy_dir is not None:
        files += _spread(_python_sources(sympy_dir, {"parsing", "testing", "utilities",
                                                     "interactive", "external", "printing"}), 80)
    return _docstring_texts(files, public_only=False, per_file=30)


@_builtin("ml_docs", "Docstrings of transformers, trl, peft and accelerate (ML engineering prose)",
          "transformers, trl, peft or accelerate")
def _load_ml_docs() -> list[str]:
    files: list[Path] = []
    transformers_dir = _optional_package_dir("transformers")
    if transformers_dir is not None:
        library = [p for p in _python_sources(transformers_dir, {"models"})
                   if not p.name.startswith("dummy_")]
        models = [p for p in _python_sources(transformers_dir / "models")
                  if p.name.startswith(("modeling_", "configuration_", "tokenization_",
                                        "processing_", "image_processing_"))]
        files += _spread(library, 50) + _spread(models, 25)
    for package in ("trl", "peft", "accelerate"):
        package_dir = _optional_package_dir(package)
        if package_dir is not None:
            files += _spread(_python_sources(package_dir), 25)
    if not files:
        raise _SourceMissing("none of transformers, trl, peft, accelerate is installed")
    return _docstring_texts(files, public_only=True, per_file=15)


_CHANGELOG_TITLE = re.compile(
    r"^(change ?log|changes|release notes|release history|history|what'?s new|news)\b.{0,40}$",
    re.IGNORECASE,
)
_VERSION = re.compile(r"\bv?\d+\.\d+")


def _heading_level(lines: list[str], i: int) -> str | None:
    """Markdown '#'-run or reST underline character when line ``i`` is a heading, else None."""
    line = lines[i]
    markdown = re.match(r"^(#{1,6})\s+\S", line)
    if markdown:
        return markdown.group(1)
    next_line = lines[i + 1] if i + 1 < len(lines) else ""
    underline = _UNDERLINE.match(next_line)
    if line.strip() and not line[:1].isspace() and underline and len(next_line.strip()) >= 3:
        return underline.group(1)
    return None


def _metadata_parts(text: str) -> tuple[str, str]:
    """A METADATA file's long description split into (README part, changelog part).

    The changelog runs from a 'Changelog'/'History'/'Release notes' heading that is followed by
    version numbers to the next heading of the same level that is not a version heading.
    """
    metadata = email.parser.Parser(policy=email.policy.compat32).parsestr(text)
    body = metadata.get_payload() if not metadata.is_multipart() else ""
    if not isinstance(body, str) or not body.strip():
        body = metadata.get("Description", "") or ""
    lines = body.split("\n")
    for i, line in enumerate(lines):
        level = _heading_level(lines, i)
        if level is None or not _CHANGELOG_TITLE.match(line.lstrip("# ").strip()):
            continue
        end = len(lines)
        for k in range(i + 2, len(lines)):
            other = _heading_level(lines, k)
            if other is not None and (other == level or (level[0] == "#" and other[0] == "#"
                                                         and len(other) < len(level))):
                if not _VERSION.search(lines[k]):
                    end = k
                    break
        section = lines[i:end]
        if any(_VERSION.search(other) for other in section[1:20]):
            return "\n".join(lines[:i] + lines[end:]), "\n".join(section)
    return body, ""


_LICENSE_BOILERPLATE = re.compile(
    r"^(MIT License|Copyright \(c\))|Permission is hereby granted|PROVIDED \"AS IS\"|"
    r"Redistribution and use in source and binary forms|Licensed under the Apache License|"
    r"above copyright notice|GNU (Lesser |Library )?General Public License",
    re.IGNORECASE | re.MULTILINE,
)
_MARKUP_NOISE = ("<img", "[![", ".. image::", ".. |", "<p ", "<p>", "</p>", "<div", "</div",
                 "<a href", "<picture", "<source", "<br", "<h1", "<h2", "<h3", "<table", "<td",
                 "<!--", ".. raw::", ".. toctree", ".. _")


def _markdown_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a Markdown/reST document: code, tables, badges and HTML left out."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    kept: list[str] = []
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            kept.append("")
            continue
        kept.append("" if in_fence else line)
    paragraphs = []
    for paragraph in _paragraphs("\n".join(kept)):
        lines = [line for line in paragraph.split("\n") if not _UNDERLINE.match(line)]
        if not lines or all(line[:1] in (" ", "\t") for line in lines):  # indented code
            continue
        if any(line.lstrip().startswith(("|", "+-", ">>>", "$ ", "pip install", "__ ")) for line in lines):
            continue
        joined = "\n".join(lines)
        if _LICENSE_BOILERPLATE.search(joined):  # license text belongs to the legal domain
            continue
        if any(noise in joined for noise in _MARKUP_NOISE) or joined.startswith(".. ") \
                or joined.rstrip().endswith("::"):
            continue
        joined = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", joined)  # [text](url) -> text
        joined = re.sub(r"`([^`<]*) <[^>]*>`_+", r"\1", joined)  # reST `text <url>`_ -> text
        joined = joined.replace("**", "")
        text = _prose(joined)
        if sum(map(str.isalpha, text)) >= 0.6 * len(text):
            paragraphs += _split_prose(text)
    return paragraphs


def _metadata_files() -> list[Path]:
    files = [d / "METADATA" for d in _dist_info_dirs() if (d / "METADATA").is_file()]
    if not files:
        raise _SourceMissing("no *.dist-info/METADATA files")
    return files


@_builtin("readme_prose", "Package READMEs (long descriptions in *.dist-info/METADATA)",
          "installed packages' *.dist-info/METADATA")
def _load_readme_prose() -> list[str]:
    texts: list[str] = []
    for path in _metadata_files():
        readme, _ = _metadata_parts(_read(path))
        texts += _per_source(_pack(_markdown_paragraphs(readme), "\n\n"), 60)
    # Some READMEs paste their license: that text belongs to `legal` only (domains must not overlap,
    # whatever packages happen to be installed).
    try:
        legal = set(_cached_texts("legal"))
    except STSInputError:
        legal = set()
    return [t for t in texts if t not in legal]


def _changelog_items(text: str) -> list[str]:
    """Entries of a changelog: version headings, bullets and paragraphs, each on one line."""
    items: list[str] = []
    in_fence = False
    for paragraph in _paragraphs(text):
        current: list[str] = []
        for line in paragraph.split("\n"):
            if _FENCE.match(line):
                in_fence = not in_fence
                continue
            if in_fence or _UNDERLINE.match(line):
                continue
            if re.match(r"^\s*([-*+•]|\d+\.)\s", line) and current:
                items.append(_prose("\n".join(current)))
                current = []
            current.append(line)
        if current:
            items.append(_prose("\n".join(current)))
    return [piece for item in items if item and not _LICENSE_BOILERPLATE.search(item)
            for piece in _split_prose(item)]


@_builtin("changelog", "Release notes: changelogs of installed packages and IDLE's NEWS",
          "installed packages' METADATA changelogs and the standard library's idlelib")
def _load_changelog() -> list[str]:
    texts: list[str] = []
    for path in _metadata_files():
        _, changelog = _metadata_parts(_read(path))
        texts += _per_source(_pack(_changelog_items(changelog), "\n"), 400)
    extra = [_stdlib_dir() / "idlelib" / name for name in ("NEWS.txt", "NEWS2x.txt", "HISTORY.txt")]
    numpy_dir = _optional_package_dir("numpy")
    if numpy_dir is not None:
        extra.append(numpy_dir / "ma" / "API_CHANGES.txt")
    for path in extra:
        if path.is_file():
            texts += _pack(_changelog_items(_read(path)), "\n")
    return texts


@_builtin("nlp_tutorials", "NLTK's doctest tutorials: English explanation with >>> sessions",
          "nltk")
def _load_nlp_tutorials() -> list[str]:
    test_dir = _package_dir("nltk") / "test"
    files = _files_under(test_dir, (".doctest",)) if test_dir.is_dir() else []
    if not files:
        raise _SourceMissing(f"no *.doctest files in {test_dir}")
    texts: list[str] = []
    for path in files:
        lines = [line for line in _read(path).split("\n")
                 if not _UNDERLINE.match(line) and not re.match(r"^\.\. (Copyright|For license)", line)]
        texts += _per_source(_pack_code("\n".join(lines)), 150)
    return texts


@_builtin("chat_templates", "Jinja chat templates of chat models (Llama, Qwen, Gemma, ...)", "trl")
def _load_chat_templates() -> list[str]:
    template_dir = _package_dir("trl") / "chat_templates"
    files = _files_under(template_dir, (".jinja",)) if template_dir.is_dir() else []
    if not files:
        raise _SourceMissing(f"no *.jinja files in {template_dir}")
    texts: list[str] = []
    for path in files:
        texts += _pack_code(_read(path), target=700)
    return texts


@_builtin("markup", "HTML and XML: IDLE's HTML help, sympy's MathML XSLT, matplotlib web pages",
          "the standard library's idlelib or sympy")
def _load_markup() -> list[str]:
    files: list[Path] = []
    help_html = _stdlib_dir() / "idlelib" / "help.html"
    if help_html.is_file():
        files.append(help_html)
    sympy_dir = _optional_package_dir("sympy")
    if sympy_dir is not None:
        files += _files_under(sympy_dir / "utilities" / "mathml", (".xsl",))
    matplotlib_dir = _optional_package_dir("matplotlib")
    if matplotlib_dir is not None:
        files += _files_under(matplotlib_dir / "backends" / "web_backend", (".html",))
        files += _files_under(matplotlib_dir / "mpl-data" / "sample_data", (".xrc",))
    if not files:
        raise _SourceMissing("neither idlelib/help.html nor sympy's XSLT stylesheets exist")
    texts: list[str] = []
    for path in files:
        texts += _pack_code(_read(path), target=600)
    return texts
