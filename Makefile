# Thin targets: every one installs what it needs, so a fresh machine needs only `make demo` or `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := clang llvm libc6-dev-i386 libbpf-dev libbpf1 bpftool iproute2 tcpdump nginx-light iperf3 procps etcd-server etcd-client iptables nftables conntrack bird2
CLANG_FLAGS := -O2 -g -target bpf -Wall -Wextra -Werror -Ibpf/include -I/usr/include/x86_64-linux-gnu
BPF_SRCS := $(wildcard bpf/*.c)
BPF_OBJS := $(patsubst bpf/%.c,build/bpf/%.o,$(BPF_SRCS))
BPF_HDRS := $(wildcard bpf/include/tabby/*.h)

.PHONY: setup apt venv bpf lint test bench bench-quick bench-scripts demo down clean

setup: apt venv bpf

apt: build/.apt-done
# libc6-dev-i386: linux/icmp.h pulls libc's sys/socket.h, which under -target bpf (no
# __x86_64__) wants gnu/stubs-32.h. Re-checked when the Makefile changes (a package added to APT_PKGS). Installing etcd-server
# starts a system etcd on 2379 where systemd runs: tests start their own, so one we started is
# stopped and disabled again.
build/.apt-done: Makefile
	@mkdir -p build
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  if echo "$$missing" | grep -qw etcd-server && [ -d /run/systemd/system ]; then \
	    systemctl disable --now etcd >/dev/null 2>&1 || true; \
	  fi; \
	fi
	@touch $@

venv: $(VENV)/.done
$(VENV)/.done: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

bpf: apt $(BPF_OBJS)
build/bpf/%.o: bpf/%.c $(BPF_HDRS)
	@mkdir -p build/bpf
	clang $(CLANG_FLAGS) -c $< -o $@

lint: venv
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy src

test: setup build/bench/connload lint
	$(PY) -m pytest -q tests

# Benchmarks (root). `make bench` = `tabbyctl bench` at full size (N up to 20,000, ~25 minutes):
# tabby next to plain routing and kube-proxy's iptables/nftables layouts; results in
# bench/results/full/. `make test` runs its --quick size as a smoke test of the harness. The
# older single-purpose scripts stay under `make bench-scripts`. Every bench removes what it made,
# also on failure or Ctrl-C. See bench/README.md.
BENCH_CC := $(shell command -v gcc || command -v clang)
build/bench/connload: bench/connload.c
	@mkdir -p build/bench
	$(BENCH_CC) -O2 -Wall -Wextra -Werror -o $@ $<

bench: setup build/bench/connload
	$(VENV)/bin/tabbyctl bench

bench-quick: setup build/bench/connload
	$(VENV)/bin/tabbyctl bench --quick

bench-scripts: setup build/bench/connload
	$(PY) bench/services_scale.py
	$(PY) bench/conn_rate.py
	$(PY) bench/policy_scale.py --lab

demo: setup
	$(VENV)/bin/tabbyctl lab demo

down: venv
	$(VENV)/bin/tabbyctl lab down


clean:
	rm -rf build
