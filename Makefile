# raypipe: `make demo` and `make test` each create .venv when missing, install, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
# Exact versions of every dependency (pyproject.toml holds ranges); `make constraints` regenerates the file.
PIN    := -c constraints.txt

.PHONY: demo test test-slow bench install constraints chromium clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIN) $(TORCH)
	$(BIN)/python -m pip install -q $(PIN) -e '.[test]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# After changing pyproject.toml's dependencies and passing `make test`: write the versions installed now.
constraints: $(STAMP)
	$(BIN)/python .ci/freeze_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# Chromium renders the HTML report in one test; when it cannot be installed that test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1))) || \
	  echo "chromium not installed: the report rendering test will skip"

demo: $(STAMP)
	$(BIN)/raypipe demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Each benchmark prints its figures (ratios measured side by side in one run); see bench/RESULTS.md.
bench: $(STAMP)
	for f in bench/[!_]*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
