# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (unless VENV points elsewhere) and install into it.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; a bare `torch` would pull a multi-GB CUDA build. Override on GPU machines: TORCH=
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.txcompile-installed

.PHONY: install system-deps demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: convert the bundled all-MiniLM-L6-v2 with a verified pipeline into out/minilm and print the report.
demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/txcompile convert minilm --passes cleanup,fuse_qkv --format onnx -o out/minilm --force

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 -q

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/optimize_latency.py

# Optional system packages for the HTML-screenshot and Graphviz tests (they skip cleanly without them). Needs root.
system-deps:
	command -v chromium >/dev/null && command -v dot >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium graphviz)

clean:
	rm -rf $(VENV) build *.egg-info
