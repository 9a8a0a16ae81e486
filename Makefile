# Two entry points: `make test` and `make demo`. Each creates .venv when missing and
# installs the project with its extras, pinned by constraints.txt.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: test demo bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch alone first, so the CPU build on disk is used and no CUDA build is pulled.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,interop,demo,serve]'
	# llm-compressor, the GPTQ oracle, without its declared dependencies: 0.14 pins
	# transformers<=5.17 and compressed-tensors==0.19, yet imports and runs GPTQ with our
	# transformers and compressed-tensors 0.20 (its runtime needs, loguru and requests,
	# are in the interop extra). With its dependencies pip would move the transformers pin.
	$(PY) -m pip install -q --no-deps llmcompressor==0.14.0.1
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=20 -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/lora_step.py

clean:
	rm -rf $(VENV) demo_out
