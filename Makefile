# The two front-door commands: `make demo` (end-to-end on Gemma 3 270M, offline) and `make test`.
.PHONY: setup demo test test-fast

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.venv/.sts-installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: .venv/.sts-installed

demo: .venv/.sts-installed
	.venv/bin/sts demo

test: .venv/.sts-installed
	bash scripts/install_browser.sh
	.venv/bin/lint-imports  # the layers: a lower layer never imports a higher one (setup.cfg)
	.venv/bin/python -m pytest -p no:cacheprovider --timeout 900

test-fast: .venv/.sts-installed
	.venv/bin/python -m pytest -p no:cacheprovider -m "not slow"
