# The commands of the README:
#   make quickstart   set up .venv, train the tiny model on the embedded Shakespeare corpus (CPU), report
#   make test         set up .venv and run the test suite
#   make golden       rewrite tests/assets/golden_debug_losses.json, the losses tests/test_golden.py expects
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/quickstart
# test processes (pytest-xdist): the tests run one thread each, so one process per core (17.8 -> 10.4 min on 2 cores)
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: install quickstart test golden lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/mdlm-kit fit --config configs/shakespeare.yaml --trainer.default_root_dir $(RUN_DIR)
	$(BIN)/mdlm-kit report --checkpoint $(RUN_DIR)/checkpoints/last.ckpt --num_samples 3 --sample_length 96

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# after a change meant to alter training (objective, schedule, model, data order, optimizer): review the diff
golden: $(STAMP)
	$(BIN)/python tests/golden.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
