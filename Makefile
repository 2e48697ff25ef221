# mmssm developer commands (see README.md).
PY ?= .venv/bin/python
DATA ?= data/tiny
WORK ?= work_dirs/demo_mask_rcnn

.PHONY: setup data demo test test-slow bench gpu-check

setup:           ## create .venv with the tested stack (mmaction2 too; WITH_VIDEO=0 skips it) and mmssm (editable)
	bash tools/setup_env.sh

data:            ## write the tiny real-format datasets
	$(PY) tools/misc/make_tiny_datasets.py --out $(DATA)

demo:            ## main job: a Mask R-CNN (V2M-S* backbone) learns on CPU; summary + $(WORK)/demo.png
	$(PY) tools/misc/demo.py --data $(DATA) --work-dir $(WORK)

test:            ## the default test run (what CI runs)
	$(PY) -m pytest

test-slow:       ## the slow end-to-end tier
	$(PY) -m pytest -m slow

bench:           ## CPU benchmarks (print ratios side by side)
	PYTHONPATH=. $(PY) benchmarks/bench_selective_scan.py
	PYTHONPATH=. $(PY) benchmarks/bench_s4nd.py

gpu-check:       ## on a CUDA machine: kernels vs references, scan + model benchmarks, --amp Mask R-CNN (< 8 min)
	$(PY) tools/gpu_check.py
