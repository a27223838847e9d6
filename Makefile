# make test  -- create .venv, install torch + tst-megatron, run the test suite
# make demo  -- the embedded default main job: a tiny TST run + matching baseline on CPU
PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver, install the CPU build of torch: a local wheel when pip
# has one (find-links, as on our CI machines), else PyTorch's CPU index -- never PyPI's default
# Linux wheel, which bundles CUDA (GBs). Its dependencies then come from the usual index.
# On GPU machines the package's own install brings pip's default (CUDA) torch into .venv; to keep
# an environment's torch, `pip install -e '.[test]'` there instead (setup.py accepts a range).
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: test demo install clean

$(VENV)/.installed: setup.py
	$(PYTHON3) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install -q --no-index --no-deps "$(TORCH_CPU)" 2>/dev/null \
	      || $(PY) -m pip install -q --no-deps --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_CPU)" \
	      || { echo "make: no CPU build of $(TORCH_CPU) (no local wheel, $(TORCH_CPU_INDEX) unreachable);" \
	              "install one into $(VENV) by hand, or set TORCH_CPU / TORCH_CPU_INDEX" >&2; exit 1; }; \
	    $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(PY) -m tst_megatron.demo

clean:
	rm -rf $(VENV) *.egg-info
