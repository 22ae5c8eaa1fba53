# dgmood: `make demo` and `make test` are all a new user needs (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the local CPU wheel on the project's machines; elsewhere pip picks the
# build your platform wants. Override with e.g. `make TORCH_SPEC=torch demo`.
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2
# The shared data folder beside the checkout, when there is one; else dgmood's own lookup
# ($$DGMOOD_DATA, then ~/.cache/dgmood/data, filled by `dgmood data download`).
DGMOOD_DATA ?= $(if $(wildcard ../shared/data/fashion-mnist),$(abspath ../shared/data),)
export DGMOOD_DATA
export OMP_NUM_THREADS := $(THREADS)
export MKL_NUM_THREADS := $(THREADS)
export OMP_WAIT_POLICY ?= PASSIVE

DEMO_RUN ?= runs/demo
# The default (combined) detector beside the MSMA k-NN and the raw-pixel 5-NN on the full test sets; sized to stay
# within 10 minutes from a fresh clone on 2 cores, install included (docs/results.md).
DEMO_ARGS ?= --steps 1500 --fit-n 4000 --in fashion-mnist:test --ood mnist:test --ood uniform[:1000] --ood gaussian[:1000]
# The score model the dual-threshold and paper-reproduction tables were measured on: the demo's until 2026-12-03,
# (48, 96, 96) channels, 1,500 steps (the demo now trains the faster default architecture).
REFERENCE_RUN ?= runs/fm-score
REFERENCE_NET ?= --channels 48,96,96

.PHONY: venv demo test test-slow bench bench-cifar bench-dual reproduce clean-venv

# What the demo needs (the package); the tests add their extras on top.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	@if [ -z "$$DGMOOD_DATA" ]; then $(BIN)/dgmood data download fashion-mnist && $(BIN)/dgmood data download mnist; fi
	$(BIN)/dgmood run --run $(DEMO_RUN) --threads $(THREADS) $(DEMO_ARGS)

test: $(BIN)/.installed-test
	$(BIN)/lint-imports
	$(BIN)/pytest -q -m "not slow"

# The tests marked slow (a minute or more each; README.md#development); .ci/run runs them after `make test`.
# pytest exits 5 when it selects no test: not a failure here.
test-slow: $(BIN)/.installed-test
	$(BIN)/pytest -q -m slow || [ $$? -eq 5 ]

bench: $(BIN)/.installed-test
	$(BIN)/pip install -e ".[test,bench]" >/dev/null
	$(BIN)/python benchmarks/bench.py --threads $(THREADS) --ablate
	@test -f $(DEMO_RUN)/checkpoint/checkpoint.json || $(MAKE) demo
	$(BIN)/python benchmarks/speed.py --run $(DEMO_RUN) --threads $(THREADS)
	$(BIN)/python benchmarks/localisation.py --run $(DEMO_RUN) --threads $(THREADS)
	$(BIN)/python benchmarks/stream.py --threads $(THREADS)

# Natural photographs (issue 27): the CIFAR-10 score model (50,000 training JPEGs, 16,000 steps of 128, mirrored at
# random; about 45 minutes on 2 cores with AMX bf16), then every detector against near and far OOD sets, each as it is
# and JPEG-matched, and the in-distribution-made checks (docs/results.md). Resumable: training continues from its last
# checkpoint and statistics are cached in the run. An hour-scale job: `nohup make bench-cifar > cifar.log 2>&1 &`.
CIFAR_RUN ?= runs/cifar10
CIFAR_TRAIN ?= --data cifar10 --channels 32,64,128 --steps 16000 --checkpoint-every 500
bench-cifar: venv
	$(BIN)/pip install -e ".[test]" >/dev/null
	$(BIN)/dgmood train --run $(CIFAR_RUN) $(CIFAR_TRAIN) --threads $(THREADS) --quiet
	$(BIN)/python benchmarks/cifar.py --run $(CIFAR_RUN) --threads $(THREADS)
	$(BIN)/python benchmarks/speed.py --run $(CIFAR_RUN) --data cifar10:test --memory-n 0 --threads $(THREADS) \
		--out $(CIFAR_RUN)/bench-speed

# Dual threshold (issue 3): trains what is missing (flows 2500 steps; score models of the reference architecture,
# 1500 and 4000 steps), then evaluates both lenses; statistics are cached per run.
bench-dual: venv
	$(BIN)/dgmood train --run $(REFERENCE_RUN) --steps 1500 $(REFERENCE_NET) --threads $(THREADS) --quiet
	$(BIN)/dgmood train --run runs/flow --model flow --steps 2500 --checkpoint-every 250 --threads $(THREADS) --quiet
	$(BIN)/dgmood train --run runs/mnist-score-ref --data mnist --steps 1500 $(REFERENCE_NET) --threads $(THREADS) --quiet
	$(BIN)/dgmood train --run runs/fm-long-ref --steps 4000 $(REFERENCE_NET) --threads $(THREADS) --quiet
	$(BIN)/dgmood train --run runs/mnist-flow --data mnist --model flow --steps 2500 --checkpoint-every 250 --threads $(THREADS) --quiet
	$(BIN)/python benchmarks/dual.py --score-run $(REFERENCE_RUN) --mnist-score-run runs/mnist-score-ref --threads $(THREADS) --only flow,flipd,flipd-small,nb,mnist
	$(BIN)/python benchmarks/dual.py --score-run runs/fm-long-ref --threads $(THREADS) --only flipd --out runs/bench-dual-fmlong.json
	$(BIN)/python benchmarks/dual.py --threads $(THREADS) --only mnist-flow --out runs/bench-dual-mnist-flow.json

# Every figure and table of docs/reproduction.md (needs the runs of `make bench-dual`).
reproduce: venv
	$(BIN)/dgmood train --run $(REFERENCE_RUN) --steps 1500 $(REFERENCE_NET) --threads $(THREADS) --quiet
	$(BIN)/python benchmarks/reproduce.py --threads $(THREADS) all

clean-venv:
	rm -rf $(VENV)
