"""Built-in text domains: real offline text, within the length bounds, deterministic, distinct."""

from __future__ import annotations

import collections
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sts_callback.core import corpora
from sts_callback.core.errors import STSInputError

BUILTIN_DOMAINS = sorted(corpora.available_domains())
CODE_DOMAINS = ("python_code", "cpp_code", "chat_templates", "markup", "nlp_tutorials")
PROSE_DOMAINS = ("legal", "readme_prose")


@pytest.fixture(scope="module")
def domain_texts() -> dict[str, list[str]]:
    corpora.clear_cache()
    texts = {}
    for name in BUILTIN_DOMAINS:
        start = time.perf_counter()
        texts[name] = corpora.load_domain(name)
        # the budget is 5 s on an idle 2-core machine; the margin absorbs a busy one
        assert time.perf_counter() - start < 10, f"loading {name} took too long"
    return texts


@pytest.fixture
def scratch_domain():
    """A name free for register_domain, removed again afterwards."""
    name = "test_scratch_domain"
    yield name
    corpora._DOMAINS.pop(name, None)
    corpora.clear_cache()


def test_builtin_domains_have_names_and_descriptions():
    domains = corpora.available_domains()
    assert len(domains) >= 8
    for required in ("python_code", "cpp_code", "python_reference", "legal", "math", "ml_docs",
                     "readme_prose"):
        assert required in domains
    assert all(isinstance(d, str) and d and "\n" not in d for d in domains.values())


@pytest.mark.parametrize("name", BUILTIN_DOMAINS)
def test_domain_has_enough_unique_texts_within_bounds(domain_texts, name):
    texts = domain_texts[name]
    assert corpora.MIN_CHARS == 200 and corpora.MAX_CHARS == 2000
    assert 300 <= len(texts) <= corpora.MAX_TEXTS_PER_DOMAIN
    assert all(isinstance(t, str) and 200 <= len(t) <= 2000 for t in texts)
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", BUILTIN_DOMAINS)
def test_whitespace_is_normalised(domain_texts, name):
    for text in domain_texts[name]:
        assert text == text.strip("\n").rstrip()  # code may start indented
        assert "\n\n\n" not in text and "\r" not in text
        assert not re.search(r"[ \t]+\n", text), text[:200]


def test_code_keeps_newlines_and_prose_is_collapsed(domain_texts):
    for name in CODE_DOMAINS:
        with_newlines = sum("\n" in t for t in domain_texts[name])
        assert with_newlines >= 0.9 * len(domain_texts[name]), name
    for name in PROSE_DOMAINS:
        for text in domain_texts[name]:
            assert "\n" not in text.replace("\n\n", " "), text[:200]
            assert "  " not in text and text == text.strip()


def test_loading_is_deterministic(domain_texts):
    corpora.clear_cache()
    for name in BUILTIN_DOMAINS:
        assert corpora.load_domain(name) == domain_texts[name], name


def test_returned_list_is_a_copy(domain_texts):
    texts = corpora.load_domain("legal")
    texts.clear()
    assert corpora.load_domain("legal") == domain_texts["legal"]


def test_max_texts_keeps_an_even_spread(domain_texts):
    subset = corpora.load_domain("python_code", max_texts=25)
    assert len(subset) == 25
    assert set(subset) <= set(domain_texts["python_code"])
    assert subset[0] == domain_texts["python_code"][0]
    assert subset == corpora.load_domain("python_code", max_texts=25)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(STSInputError):
            corpora.load_domain("python_code", max_texts=bad)


def test_no_text_appears_in_two_domains(domain_texts):
    owner: dict[str, str] = {}
    for name, texts in domain_texts.items():
        for text in texts:
            assert owner.setdefault(text, name) == name, f"shared by {owner[text]} and {name}"


def _bag_of_words(text: str) -> collections.Counter:
    return collections.Counter(t.lower() for t in re.findall(r"[A-Za-z_]+|[^\sA-Za-z_0-9]", text))


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    norm = math.sqrt(sum(x * x for x in weights.values())) or 1.0
    return {w: x / norm for w, x in weights.items()}


def test_domains_are_told_apart_by_their_vocabulary(domain_texts):
    """A nearest-centroid classifier on tf-idf vectors recognises each domain's held-out texts."""
    sample = {name: corpora.load_domain(name, max_texts=300) for name in domain_texts}
    train = {name: [_bag_of_words(t) for t in texts[0::2]] for name, texts in sample.items()}
    held_out = {name: [_bag_of_words(t) for t in texts[1::2]] for name, texts in sample.items()}
    domains_with_word = collections.Counter()
    for bags in train.values():
        domains_with_word.update(set().union(*bags))
    # words used by every domain weigh nothing, so shared English/syntax does not count
    idf = {w: math.log(len(train) / n) for w, n in domains_with_word.items()}

    def unit_vector(bag: collections.Counter) -> dict[str, float]:
        return _normalised({w: (1 + math.log(c)) * idf[w] for w, c in bag.items() if idf.get(w)})

    centroids = {}
    for name, bags in train.items():
        total = collections.Counter()
        for bag in bags:
            total.update(unit_vector(bag))
        centroids[name] = _normalised(total)

    accuracies = {}
    for name, bags in held_out.items():
        correct = 0
        for bag in bags:
            vector = unit_vector(bag)
            scores = {other: sum(x * c.get(w, 0.0) for w, x in vector.items())
                      for other, c in centroids.items()}
            correct += max(scores, key=scores.get) == name
        accuracies[name] = correct / len(bags)
    assert min(accuracies.values()) >= 0.7, accuracies
    assert sum(accuracies.values()) / len(accuracies) >= 0.9, accuracies

    for a in centroids:
        for b in centroids:
            if a < b:
                similarity = sum(x * centroids[b].get(w, 0.0) for w, x in centroids[a].items())
                assert similarity < 0.6, (a, b, similarity)


def test_unknown_domain_error_lists_available_names():
    with pytest.raises(STSInputError) as error:
        corpora.load_domain("no_such_domain")
    message = str(error.value)
    assert "no_such_domain" in message
    assert all(name in message for name in BUILTIN_DOMAINS)
    assert isinstance(error.value, ValueError)


def test_register_domain(scratch_domain):
    calls = []

    def loader() -> list[str]:
        calls.append(1)
        return ["first text", "", "second text", "first text"]

    corpora.register_domain(scratch_domain, loader, "two tiny texts")
    assert corpora.available_domains()[scratch_domain] == "two tiny texts"
    assert corpora.load_domain(scratch_domain) == ["first text", "second text"]
    assert corpora.load_domain(scratch_domain, max_texts=1) == ["first text"]
    assert len(calls) == 1  # cached

    with pytest.raises(STSInputError, match="already exists"):
        corpora.register_domain(scratch_domain, loader)
    corpora.register_domain(scratch_domain, lambda: ["replaced"], overwrite=True)
    assert corpora.load_domain(scratch_domain) == ["replaced"]
    assert corpora.available_domains()[scratch_domain]  # a default description


def test_register_domain_rejects_bad_input(scratch_domain):
    with pytest.raises(STSInputError):
        corpora.register_domain("", lambda: ["x"])
    with pytest.raises(STSInputError):
        corpora.register_domain(scratch_domain, ["not", "callable"])  # type: ignore[arg-type]
    with pytest.raises(STSInputError, match="already exists"):
        corpora.register_domain("legal", lambda: ["x"])
    corpora.register_domain(scratch_domain, lambda: "a string, not a list")  # type: ignore
    with pytest.raises(STSInputError, match="list of strings"):
        corpora.load_domain(scratch_domain)
    corpora.register_domain(scratch_domain, lambda: [], overwrite=True)
    with pytest.raises(STSInputError, match="no texts"):
        corpora.load_domain(scratch_domain)


def test_missing_source_names_the_package(monkeypatch):
    def not_installed(package):
        raise corpora._SourceMissing(f"package {package!r} not found")

    monkeypatch.setattr(corpora, "_package_dir", not_installed)
    corpora.clear_cache()
    try:
        with pytest.raises(STSInputError, match="trl"):
            corpora.load_domain("chat_templates")
    finally:
        corpora.clear_cache()


def test_loading_imports_no_heavy_package():
    """Docstrings and sources are parsed as text, never imported."""
    # the package __init__ may import torch itself; what counts is what loading adds
    code = (
        "import sys\n"
        "from sts_callback.core import corpora\n"
        "before = set(sys.modules)\n"
        "for name in ('math', 'ml_docs', 'cpp_code', 'chat_templates', 'nlp_tutorials'):\n"
        "    corpora.load_domain(name, max_texts=5)\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'accelerate', 'sympy', 'scipy', 'nltk')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
