# Developer/CI tasks. Everything lives in the project's own $(VENV); this Makefile never
# touches a user's ComfyUI environment (users install with requirements.txt, keeping their torch).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PYTEST_ARGS ?=
# The torch pair installed into a fresh dev/CI venv: torchvision must match torch exactly, or
# the ComfyUI test host fails at start-up (e.g. "operator torchvision::nms does not exist").
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
TORCH_VERSION := $(PY) -c "import torch; print(torch.__version__)"

.PHONY: install test demo gaussian-study clean distclean

install: $(VENV)/.installed

# Stamp file: reinstalls only when the venv is new or the dependency files changed.
# torch goes in first, so that the editable install finds it satisfied and pulls no other build;
# that install must leave torch exactly as it was. Ray (the 'distributed' extra) is for `batch` and its tests.
$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_PAIR)
	set -e; before=$$($(TORCH_VERSION)); \
	$(PY) -m pip install -e '.[test,distributed]'; \
	after=$$($(TORCH_VERSION)); \
	if [ "$$before" != "$$after" ]; then \
	  echo "error: 'pip install -e .[test,distributed]' changed torch $$before -> $$after" >&2; exit 1; fi
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job on the bundled default: "a red cube" → L²-VSD on the bundled toy prior → GLB, turntable, curves,
# metrics in out/demo (metrics.json: the field's scores, and mesh_iou, the GLB's silhouette IoU against the volume
# renders from the turntable's cameras).
demo: $(VENV)/.installed
	$(PY) -m l2vsd_core.toys.world.demo --prompt "a red cube" --method l2vsd --out out/demo

# The paper's 2D Gaussian study (README).
gaussian-study: $(VENV)/.installed
	mkdir -p out
	$(PY) -m l2vsd_core.toys.gaussian --seeds 5 --json out/gaussian.json --plot out/gaussian.png

clean:
	rm -rf out .pytest_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
