# hevisum: two commands do everything on a fresh machine:
#   make run    create .venv, install, run the main job on generated demo data
#   make test   create .venv if needed, run the whole test suite
# For notebooks: make init (venv + JupyterLab + the "hevisum" Jupyter kernel), then make lab.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hevisum-installed
LAB_STAMP := $(VENV)/.hevisum-lab-installed
# The CPU build of torch is installed first unless the venv already has a torch (a GPU user's own build is kept).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
RUN_OUT ?= runs/demo
# JupyterLab (make lab): loopback only, port 8888, a random token unless LAB_TOKEN is set; see scripts/lab.sh.
LAB_IP    ?= 127.0.0.1
LAB_PORT  ?= 8888
LAB_TOKEN ?=
LAB_ROOT  ?= $(CURDIR)
# Extra JupyterLab arguments, e.g. LAB_ARGS=--allow-root when you must run as root (token options are refused).
LAB_ARGS  ?=
# Exported so the launcher reads them from its environment: the token then never appears in a command line.
export LAB_IP LAB_PORT LAB_TOKEN LAB_ROOT
KERNEL_NAME    ?= hevisum
KERNEL_DISPLAY ?= Python (.venv) hevisum

.PHONY: help install torch run test init lab clean reset

help:
	@echo "make run      create .venv, install, run 'hevisum run' on generated demo data (-> $(RUN_OUT))"
	@echo "make test     run the test suite (creates .venv if needed)"
	@echo "make init     create .venv, install with JupyterLab, register the Jupyter kernel '$(KERNEL_DISPLAY)'"
	@echo "make lab      start JupyterLab on http://$(LAB_IP):$(LAB_PORT) with a token (LAB_IP, LAB_PORT, LAB_TOKEN, LAB_ROOT, LAB_ARGS)"
	@echo "make clean    remove $(VENV) and the Jupyter kernel spec '$(KERNEL_NAME)'"
	@echo "make reset    clean, then init"
	@echo "make torch    create .venv and install torch only ($(TORCH_SPEC); an installed torch is kept)"
	@echo "variables: VENV=$(VENV) PYTHON=$(PYTHON) TORCH_SPEC=$(TORCH_SPEC) TORCH_PIP_ARGS='$(TORCH_PIP_ARGS)'"

# Create the venv if missing, then torch first so pip does not pick a CUDA build on its own.
define venv_and_torch
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi
endef

$(STAMP): pyproject.toml
	$(venv_and_torch)
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

$(LAB_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[lab]"
	@touch $(LAB_STAMP)

install: $(STAMP)

# Torch alone: lets the Docker image keep this large download in its own cached layer.
torch:
	$(venv_and_torch)

run: $(STAMP)
	$(BIN)/hevisum run --out $(RUN_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

init: $(LAB_STAMP)
	$(BIN)/python -m ipykernel install --user --name "$(KERNEL_NAME)" --display-name "$(KERNEL_DISPLAY)"

lab: $(LAB_STAMP)
	@LAB_PYTHON="$(abspath $(BIN))/python" bash scripts/lab.sh -- $(LAB_ARGS)

# Only a folder with a pyvenv.cfg is removed, so a mistyped VENV=... cannot delete anything else.
# The kernel spec goes first, while the venv's jupyter still exists to remove it.
clean:
	@if [ -e "$(VENV)" ] && [ ! -f "$(VENV)/pyvenv.cfg" ]; then \
	  echo "refusing to remove VENV='$(VENV)': it has no pyvenv.cfg, so it is not a virtual environment"; exit 2; \
	fi
	@if [ -x "$(BIN)/jupyter" ]; then jup="$(BIN)/jupyter"; \
	elif command -v jupyter >/dev/null 2>&1; then jup=jupyter; else jup=""; fi; \
	if [ -n "$$jup" ] && "$$jup" kernelspec list 2>/dev/null | awk '{print $$1}' | grep -qx "$(KERNEL_NAME)"; then \
	  "$$jup" kernelspec remove -f "$(KERNEL_NAME)"; \
	else \
	  echo "no Jupyter kernel spec '$(KERNEL_NAME)' to remove"; \
	fi
	rm -rf "$(VENV)"

# Sequential on purpose: under make -j, prerequisites "clean init" could run at the same time.
reset:
	$(MAKE) clean
	$(MAKE) init
