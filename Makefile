# `make demo` and `make test` work on a fresh machine: each creates the venv and installs
# what it needs. pip caches the llama-cpp-python wheel it builds (~5 min on 2 cores), so
# later venvs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GT := $(VENV)/bin/gputorrent
PYTEST_ARGS ?=
# GPU=cuda (or hip, metal, vulkan): llama.cpp built with that offload. Each kind builds into its
# own pip cache, so the CPU wheel is never reused for a GPU build (pip keys its cache by the sdist,
# not by CMAKE_ARGS) and switching back and forth costs no rebuild. docs/gpu.md has the details.
GPU ?=
GPU_CMAKE_cuda := -DGGML_CUDA=on
GPU_CMAKE_hip := -DGGML_HIP=on
GPU_CMAKE_metal := -DGGML_METAL=on
GPU_CMAKE_vulkan := -DGGML_VULKAN=on
LLAMA_CPP_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)

.PHONY: install model demo lint test nat-deps bench bench-anchor gpu-bundle clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

$(VENV)/.gpu-%: $(VENV)/.installed
	@test -n "$(GPU_CMAKE_$*)" || { echo "GPU=$* is not one of: cuda hip metal vulkan" >&2; exit 2; }
	CMAKE_ARGS="$(GPU_CMAKE_$*)" PIP_CACHE_DIR="$(HOME)/.cache/pip-$*" \
		$(PY) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps $(LLAMA_CPP_PIN)
	$(PY) -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 'built without GPU offload')"
	rm -f $(VENV)/.gpu-*
	touch $@

install: $(VENV)/.installed $(if $(GPU),$(VENV)/.gpu-$(GPU))

model: install
	$(GT) models pull smollm2

demo: model
	$(PY) -m gputorrent.demo

lint: install
	$(VENV)/bin/ruff check gputorrent tests benchmarks
	$(VENV)/bin/mypy

# The NAT lab (tests/test_nat_*.py) needs root, iproute2 and nftables; as root, install them.
nat-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v nft >/dev/null; then \
		(apt-get install -y -qq nftables iproute2 >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq nftables iproute2 >/dev/null)) && echo "installed nftables"; fi

test: model lint nat-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/dht.py
	$(PY) benchmarks/failover.py
	$(PY) benchmarks/concurrency.py
	$(PY) benchmarks/chaos.py
	$(PY) benchmarks/fuzz.py
	$(PY) benchmarks/shards.py
	$(PY) benchmarks/reciprocity.py
	$(PY) benchmarks/pull.py
	$(PY) benchmarks/simulate.py --sizes 1000,10000
	$(PY) benchmarks/simulate.py --shard-keys --peers 10000 --minutes 10 --lookups 300

# The mesh beside llama.cpp's own server; builds llama-server once (~12 min on 2 cores).
bench-anchor: model
	$(PY) benchmarks/anchor.py

# The GPU check (benchmarks/gpu/README.md): .gpu-kit/ (ignored by git) holds the kit's scripts, the
# llama.cpp sources of the pinned llama-cpp-python, the demo model's tokenizer and the wheels the
# GPU machine (no network) installs. Then: the device tool runs `bash .gpu-kit/run.sh` with carry
# [".gpu-kit"]. Wheels that cannot be downloaded (fastecdsa for cp312) are taken from a kit already
# on this machine (../shared/gpu-kit/whl) when there is one.
gpu-bundle: model
	rm -rf .gpu-kit && mkdir -p .gpu-kit/whl && cp -r benchmarks/gpu/. .gpu-kit/
	if [ -d ../shared/gpu-kit/whl ]; then cp -n ../shared/gpu-kit/whl/*.whl .gpu-kit/whl/ 2>/dev/null || true; fi
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: $(LLAMA_CPP_PIN) -d .gpu-kit/.sdist
	$(PY) .gpu-kit/remake_llama.py .gpu-kit/.sdist/*.tar.gz
	$(PY) .gpu-kit/extract_tokenizer.py "$$($(GT) models info smollm2 --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["path"])')" .gpu-kit/tokenizer-smollm2.json.gz
	rm -rf .gpu-kit/.sdist
	bash .gpu-kit/prepare.sh --prune

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
