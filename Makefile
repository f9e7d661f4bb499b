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

.PHONY: install lock newest model demo lint test nat-deps bench bench-anchor gpu-bundle clean

# Installs are reproducible: every package at the exact version and hash in requirements.lock
# (pip-compile from pyproject's floors, `make lock`), so a release upstream cannot turn a fresh
# clone red. pyproject keeps the floors for those who use gputorrent as a library; `make newest`
# tries the newest releases in a venv of its own and reports what breaks.
PIP_PIN := 26.3
PIP_TOOLS_PIN := 7.7.0
# llama.cpp for the CPU is built for a fixed target (x86-64-v3: AVX2, FMA, F16C), not
# -march=native: a native wheel in pip's cache runs only where it was built, and on a VM that
# lists AMX without enabling it (Firecracker here) it dies with SIGILL in ggml's AMX matmul.
# Its own pip cache, as for the GPU kinds: pip keys a built wheel by the sdist, not CMAKE_ARGS.
CPU_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==$(PIP_PIN)
	awk '/^llama-cpp-python==/{p=1;print;next} p&&/^ /{print;next} {p=0}' requirements.lock > $(VENV)/llama.lock
	CMAKE_ARGS="$(CPU_CMAKE)" PIP_CACHE_DIR="$(HOME)/.cache/pip-llama-cpu" \
		$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r $(VENV)/llama.lock
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

$(VENV)/.gpu-%: $(VENV)/.installed
	@test -n "$(GPU_CMAKE_$*)" || { echo "GPU=$* is not one of: cuda hip metal vulkan" >&2; exit 2; }
	CMAKE_ARGS="$(GPU_CMAKE_$*)" PIP_CACHE_DIR="$(HOME)/.cache/pip-$*" \
		$(PY) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps $(LLAMA_CPP_PIN)
	$(PY) -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 'built without GPU offload')"
	rm -f $(VENV)/.gpu-*
	touch $@

install: $(VENV)/.installed $(if $(GPU),$(VENV)/.gpu-$(GPU))

# The lock, from pyproject's dependencies and the dev extra, with hashes. Run it after changing
# a dependency in pyproject.toml, and commit both. pip-compile uses pip's resolver and pip's
# configuration, so torch==2.13.0 resolves to the CPU build on this machine kind's disk.
lock:
	test -x .venv-tools/bin/pip-compile || { $(PYTHON) -m venv .venv-tools && \
		.venv-tools/bin/pip install -q pip==$(PIP_PIN) pip-tools==$(PIP_TOOLS_PIN); }
	.venv-tools/bin/pip-compile -q --extra dev --generate-hashes --allow-unsafe --strip-extras \
		--build-deps-for editable --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml

# Not part of CI: the newest releases pyproject allows, in .venv-newest, then lint and the tests
# (PYTEST_ARGS narrows them); prints every version that moved from the lock and what failed.
newest:
	PYTHON=$(PYTHON) CPU_CMAKE="$(CPU_CMAKE)" LLAMA_CPP_PIN="$(LLAMA_CPP_PIN)" bash .ci/newest $(PYTEST_ARGS)

model: install
	$(GT) models pull smollm2

demo: model
	$(PY) -m gputorrent.demo

lint: install
	$(VENV)/bin/ruff check gputorrent tests benchmarks
	$(VENV)/bin/mypy

# The NAT lab (tests/test_nat_*.py) needs root, iproute2 and nftables; as root, install them.
nat-deps:
	@if [ "$$(id -u)" = 0 ] && ! (command -v nft && command -v iptables-legacy) >/dev/null; then \
		(apt-get install -y -qq nftables iptables iproute2 >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq nftables iptables iproute2 >/dev/null)) && \
		echo "installed nftables and iptables"; fi

test: model lint nat-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/attention.py
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
	CMAKE_ARGS="$(CPU_CMAKE)" $(PY) benchmarks/anchor.py

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
	rm -rf $(VENV) .venv-newest .venv-tools *.egg-info .pytest_cache .hypothesis
