# Every target installs what it needs first: a fresh Debian bookworm machine as root
# needs nothing but `make demo` or `make test`.
SHELL := /bin/bash
# The venv's interpreter: Debian's python3 where there is one. Debian builds it with PGO and
# LTO, as the images run it (deploy/Dockerfile); a python3 built from source without them
# (pyenv's default, first on PATH on some machines) runs the proxy's Python ~20% slower
# (docs/decisions.md, "The interpreter"). `make deps PYTHON=...` picks another.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV := .venv
BIN := $(VENV)/bin
# squid-openssl: Squid built with OpenSSL (ssl_bump, for the bench's interception row); it
# replaces Debian's default GnuTLS `squid` package, with which it conflicts.
APT_PACKAGES := python3-venv runsc clang llvm libbpf-dev bpftool nftables iproute2 squid-openssl gcc-multilib \
                musl-tools \
                procps psmisc curl openssl wrk docker.io docker-compose debootstrap
PYTEST_ARGS ?=
# `egressd` on PATH: a link into this checkout's venv (the README's commands use it).
LINK ?= /usr/local/bin/egressd

.PHONY: deps apt venv link test test-unit lint demo bench clean

deps: apt venv link

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# `kubectl kustomize` renders deploy/kubernetes in the tests: Debian's kubernetes-client,
	@# unless some kubectl is installed already (another package may own /usr/bin/kubectl).
	@command -v kubectl >/dev/null || { echo "installing: kubernetes-client"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; }

# The stamp is named after the interpreter: a venv made by another one (PYTHON changed, or
# made before this rule) is made again from scratch.
INSTALLED := $(VENV)/.installed-$(subst /,_,$(PYTHON))

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(if $(wildcard $(INSTALLED)),,--clear) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Replaces a link (say, into another checkout), never a file some package installed.
link: venv
	@if [ -e "$(LINK)" ] && [ ! -L "$(LINK)" ]; then \
		echo "$(LINK) exists and is not a link: left alone; use $(CURDIR)/$(BIN)/egressd"; \
	elif ln -sfn "$(CURDIR)/$(BIN)/egressd" "$(LINK)" 2>/dev/null; then \
		echo "$(LINK) -> $(CURDIR)/$(BIN)/egressd"; \
	else \
		echo "cannot write $(LINK): use $(CURDIR)/$(BIN)/egressd, or make link LINK=~/bin/egressd"; \
	fi

# The e2e files that carry traffic end to end, run a second time on the userspace data path
# (`"datapath": "userspace"`, the tested fallback); the suite itself runs on the local fleet's
# default, the kernel path (issue 10).
E2E_USERSPACE ?= tests/e2e/test_egress.py tests/e2e/test_failover.py tests/e2e/test_fail_closed.py \
                 tests/e2e/test_live_policy.py tests/e2e/test_tls_intercept.py \
                 tests/e2e/test_topology_lifecycle.py

# Lint and types first: a tree that does not hold them fails in seconds, not after the suite.
test: deps lint
	$(BIN)/pytest -q $(PYTEST_ARGS)
	EGRESSD_E2E_DATAPATH=userspace $(BIN)/pytest -q $(E2E_USERSPACE)

test-unit: venv
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

# Every step runs even when an earlier one fails, so one run shows all three; the paths and
# rules live in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: venv
	@rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/ruff format --check . || rc=1; \
	$(BIN)/mypy || rc=1; \
	exit $$rc

demo: deps
	$(BIN)/egressd demo

bench: deps
	$(BIN)/python benchmarks/geneve_codec.py --out bench-results/geneve_codec.json
	$(BIN)/python benchmarks/limits.py --out bench-results/limits.json
	$(BIN)/egressd bench --out bench-results/data_path.json

clean:
	@if [ "$$(readlink "$(LINK)")" = "$(CURDIR)/$(BIN)/egressd" ]; then rm -f "$(LINK)"; fi
	rm -rf $(VENV) build *.egg-info bench-results
