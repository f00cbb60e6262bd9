# Everything a fresh machine needs, from the package registries only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The ONNX Runtime wheel: cpu (onnxruntime) or gpu (onnxruntime-gpu, CUDA 12). They provide the
# same module, so the other one is removed first: `make install ORT=gpu` on a CUDA host. The
# choice is remembered (.venv/.ort), so a later `make serve` or `make test` keeps it.
ORT    ?= $(or $(shell cat .venv/.ort 2>/dev/null),cpu)
OTHER_ORT := $(if $(filter gpu,$(ORT)),onnxruntime,onnxruntime-gpu)
STAMP  := $(VENV)/.installed-$(ORT)
ifeq ($(filter cpu gpu,$(ORT)),)
$(error ORT must be cpu or gpu, got '$(ORT)')
endif

.PHONY: install test test-fast lint serve clean proto prometheus browser soak fuzz

install: $(STAMP)

# torch and torchvision first, pinned: pip takes both from this machine's disk.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip uninstall --quiet -y $(OTHER_ORT) 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[$(ORT),serve,loadtest,test]'
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	echo $(ORT) > $(VENV)/.ort
	touch $(STAMP)

# The whole suite; it includes the layer contracts (lint-imports on the built wheel,
# tests/test_packaging.py) after ruff.
# Prometheus and Chromium are required here (tests/tools.py): where one is missing, the tests
# that need it fail, naming it, instead of skipping unseen.
test: install prometheus browser
	$(VENV)/bin/ruff check .
	CLIPLORA_TEST_REQUIRE_TOOLS=1 $(PY) -m pytest

# Everything but the slow kinds (pyproject.toml's markers: a real Triton, other processes,
# the wheel build, heavy model work in process): under 2 minutes on a 2-core machine.
# CI runs `make test`, all of it.
FAST := not triton and not subprocess and not packaging and not slow
test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "$(FAST)"

# Only the static checks: ruff, the wheel's single namespace and the import layers.
lint: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/test_packaging.py

# Debian's Prometheus (for the local stack and its tests), when missing and apt-get can run.
prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "note: prometheus is not installed (apt-get install -y prometheus); serving works without it"; fi; }

# Debian's Chromium and chromedriver (the playground's browser test), when missing and apt-get can run.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: chromium or chromedriver is not installed (apt-get install -y chromium chromium-driver); only the playground's browser test needs them"; fi; }

# Demo models (ViT-B-16, random weights unless CLIPLORA_DEMO_PRETRAINED is set) when the
# repository has none, then Triton + gateway + Prometheus (when installed) until Ctrl-C.
serve: install prometheus
	$(PY) -m cliplora.demo --repository model_repository
	$(VENV)/bin/cliplora serve --repository model_repository

# Not part of `make test`: ~80% of measured capacity for 10 minutes on the demo models,
# errors and gateway memory over time (report in bench/soak/).
soak: install
	$(PY) -m cliplora.demo --repository model_repository
	$(PY) -m cliplora.loadtest.soak --repository model_repository --model pets-base --minutes 10 --report bench/soak

# Not part of `make test`: coverage-guided fuzzing of image decoding (atheris/libFuzzer,
# tests/fuzz_atheris.py), FUZZ_RUNS inputs. The corpus grows in bench/fuzz/corpus (the next
# run resumes from it); a finding stops the run and is written to bench/fuzz/crash-*.
FUZZ_RUNS ?= 50000
fuzz: install
	mkdir -p bench/fuzz/corpus
	$(PY) -m tests.fuzz_atheris -runs=$(FUZZ_RUNS) -timeout=10 -rss_limit_mb=2048 \
	    -artifact_prefix=bench/fuzz/ bench/fuzz/corpus

clean:
	rm -rf $(VENV) .pytest_cache

# Regenerate the gRPC stubs from proto/ (tests check they are up to date).
proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/cliplora/v1/classifier.proto
