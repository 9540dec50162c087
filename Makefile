# clmtune: `make demo` installs and runs the embedded demo; `make test` installs and runs the test suite.
# Everything installs into .venv; torch is pinned to the CPU build through constraints.txt (install step only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/twitter_complaints

.PHONY: install test test-fast demo demo-en bench bench-chat clean

$(BIN)/.installed: pyproject.toml constraints.txt
	sh scripts/system_deps.sh  # CJK font + chromium where missing (apt-get as root; otherwise it says what to install)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,serve,tensorboard]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

# The suite without the tests marked slow (whole training runs, servers, browsers): a quick check while working
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Embedded defaults (Chinese): the shipped pretrained builtin:gpt2-zh-small fine-tuned on ChnSentiCorp hotel reviews:
# classification (LoRA and full fine-tuning), LM fine-tuning with perplexity before/after, top-k generation.
demo: install
	$(BIN)/python scripts/demo.py --out runs/demo

# English: LoRA on the shipped RAFT twitter_complaints task with the built-in tiny (random) OPT model, evaluation on
# the held-out 20 %, predictions for the unlabelled test split, generation for two prompts.
demo-en: install
	$(BIN)/clmtune train --output-dir $(RUN) --overwrite
	$(BIN)/clmtune eval --run $(RUN) --split test
	$(BIN)/clmtune generate --run $(RUN) --max-new-tokens 6 --temperature 0 \
		"Tweet text : @comcast my internet has been down for two days label : " \
		"Tweet text : Thanks @JetBlue, the crew was lovely today label : "
	@echo "demo finished: everything is in $(RUN)/"

# Training speed: tutorial recipe vs Trainer vs clmtune (fp32, bf16), ratios within one run (bench/README.md)
bench: install
	$(BIN)/python bench/bench_train.py --threads 1

# Chat fine-tuning speed: TRL's SFTTrainer (assistant-only loss, padding-free) vs clmtune (bench/README.md)
bench-chat: install
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(BIN)/python bench/bench_chat.py --threads 1

clean:
	rm -rf $(VENV) runs
