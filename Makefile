# densitylab: every target installs what it needs first. Run as root on Debian 12.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DL := $(VENV)/bin/densitylab
export MPLBACKEND := Agg

APT_CORE := qemu-system-x86 qemu-utils qemu-guest-agent libvirt-daemon-system \
	libvirt-clients libvirt-dev pkg-config gcc libc6-dev make busybox-static cpio kmod \
	numactl bpftrace zstd xz-utils
APT_TEST := chromium
VENV_STAMP := $(VENV)/.installed-$(shell sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup setup-test apt-core apt-test apt-kbuild images lab-start lab-stop doctor demo test \
	lint unit system debian-image clean-host report compare bench bench-collector bench-sampler ab-demo \
	kernels patch-ab-demo

setup: apt-core $(VENV_STAMP)

# The tests build a kernel from source too (cached outside the clone: a fresh machine
# pays one tinyconfig build, ~15-25 min on 2 cores).
setup-test: setup apt-test apt-kbuild

# Idempotent: apt runs only when a package is missing.
apt-core:
	@scripts/apt-ensure $(APT_CORE)

apt-test:
	@scripts/apt-ensure $(APT_TEST)

apt-kbuild:
	@scripts/apt-ensure $(APT_KBUILD)

$(VENV_STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

images: setup
	$(PY) -m orchestrator.images

# The Debian guest image (fleet.image: debian), cached per machine in
# $$DENSITYLAB_IMAGE_CACHE (default /var/cache/densitylab/images): ~1 min cold.
debian-image: setup
	@scripts/apt-ensure mmdebstrap e2fsprogs
	$(PY) -m orchestrator.debimage

lab-start: setup
	@scripts/labd start

lab-stop:
	@scripts/labd stop

doctor: setup lab-start
	$(DL) doctor

# The demo: 4 real guests on this machine; prints the summary. Stops the lab daemons
# afterwards if it was the one that started them.
demo: setup images
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(DL) doctor --no-bpf; $(DL) run experiments/smoke.yaml; rc=$$?; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy orchestrator

unit: setup
	$(VENV)/bin/pytest -m "not system" -q

# Everything: lint, type checks, unit and system tests (real libvirtd, QEMU, KSM, and
# one lab host booting a Debian kernel).
test: setup-test images lab-images debian-image lint
	$(VENV)/bin/pytest -q --durations=15

clean-host: setup
	$(DL) clean

report: setup
	@test -n "$(RUN)" || { echo "usage: make report RUN=results/<run-id> [RUN2=...]"; exit 2; }
	$(DL) report $(RUN) $(RUN2)

# Fleet bring-up at a planner's size: 16 tiny guests to ready, densitylab against plain
# QEMU, in A B pairs (3 pairs: about 5 minutes under TCG on 2 cores).
BENCH_GUESTS ?= 16
BENCH_ROUNDS ?= 3
bench: setup images
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(PY) bench/fleet_start.py --guests $(BENCH_GUESTS) --rounds $(BENCH_ROUNDS) --timeout-s 300; rc=$$?; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; exit $$rc

# What the per-process sampler costs at 1 Hz: 1, 50 and 200 host processes of 64 MiB,
# smaps read every sample against only when /proc/PID/maps changes (about 13 GiB of RAM
# at 200). Target: under 2% of one core at 200 processes.
bench-sampler: setup
	$(PY) bench/sampler_cost.py

# What the rmap_walk_ksm collector costs: NUMA migration throughput with and without the
# collector, every method the lab host offers, in ABBA pairs inside a lab host per kernel.
# About 16 minutes under TCG here (2026-12-04).
bench-collector: setup images lab-images
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(PY) bench/collector_overhead.py; rc=$$?; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; exit $$rc

# The lab-host image (Debian trixie rootfs + the 6.12 and 7.x kernels under test) for
# kernel A/B runs; needs deb.debian.org. A cache hit takes ~2 s, a build ~1-2 min.
.PHONY: lab-images
lab-images: setup
	@scripts/apt-ensure mmdebstrap e2fsprogs debian-archive-keyring qemu-utils zstd
	$(PY) -m orchestrator.labimage

# Kernel A/B: Debian 6.12 against 7.3 in lab-host VMs, rmap_walk_ksm timed by BPF fentry/fexit,
# then the report. About 12 minutes under TCG here (each window stops once its medians are
# within +-5%; the old walk's cost still varies 2-4x from trial to trial at 10,000 VMAs).
ab-demo: setup images lab-images
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(DL) run experiments/rmap-walk-ksm.yaml; rc=$$?; \
	run=$$(ls -td results/*-rmap-walk-ksm-* | head -1); \
	[ $$rc -eq 0 ] && $(DL) report $$run --out reports/out/rmap-walk-ksm; rc2=$$?; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; [ $$rc -eq 0 ] && exit $$rc2; exit $$rc

# Kernels built from source for a spec's `source:` entries (make O=, ccache), cached in
# $$DENSITYLAB_KBUILD_CACHE (default /var/cache/densitylab/kbuild) and shared by every
# clone on the machine. Run under nice -n 19; a cold tinyconfig build took ~18 min of
# make on 2 shared cores, a rebuild with ccache warm ~1 min, one patch more ~20 s.
APT_KBUILD := gcc make flex bison bc libelf-dev libssl-dev ccache patch xz-utils dpkg-dev \
	debhelper rsync  # the last two: make bindeb-pkg (its build dependencies)
kernels: setup
	@test -n "$(SPEC)" || { echo "usage: make kernels SPEC=experiments/<spec>.yaml"; exit 2; }
	@scripts/apt-ensure $(APT_KBUILD)
	$(DL) kernels build $(SPEC)

# Patch A/B: Debian's linux-source-6.12 built as is and with experiments/patches/ (same
# tree, same config), each booted in a lab host, rmap_walk_ksm timed by kprobes, then
# the report. The two kernel builds are cached (a cold pair ~20 min here, then
# seconds); the trials take about as long as ab-demo's.
patch-ab-demo: setup images lab-images
	@scripts/apt-ensure $(APT_KBUILD)
	$(DL) kernels build experiments/patch-ab.yaml
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(DL) run experiments/patch-ab.yaml; rc=$$?; \
	run=$$(ls -td results/*-patch-ab-* | grep -v -- -checks- | head -1); \
	[ $$rc -eq 0 ] && $(DL) report $$run --out reports/out/patch-ab; rc2=$$?; \
	[ $$rc -eq 0 ] && $(DL) check experiments/patch-ab.yaml; rc3=$$?; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; \
	[ $$rc -ne 0 ] && exit $$rc; [ $$rc2 -ne 0 ] && exit $$rc2; exit $$rc3

# KSM correctness checks per kernel (kernel x check table, exit 1 on a FAIL):
#   make checks                                  this machine's kernel
#   make checks SPEC=experiments/checks-lab.yaml lab hosts booting 6.12 and 7.3
.PHONY: checks
checks: setup
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(DL) check $(or $(SPEC),experiments/checks.yaml); rc=$$?; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; exit $$rc

# Real lab machines (Ansible inventory), and two lab-host VMs that stand in for them:
# SSH on loopback ports, a key pair made for them, LAB_VMS/inventory.ini.
#   make lab-vms        boot them (~1 min under TCG)    make lab-vms-stop   remove them
#   make lab-check INVENTORY=hosts.ini [PATTERN=lab]    the doctor on every machine
LAB_VMS ?= results/lab-vms
PATTERN ?= all
.PHONY: lab-vms lab-vms-stop lab-check lab-prepare lab-demo
lab-vms: setup lab-images lab-start
	$(DL) lab vms start $(LAB_VMS)

lab-vms-stop:
	$(DL) lab vms stop $(LAB_VMS)

# The kernel A/B on the two lab VMs as an inventory: boot them, run, report, remove them.
lab-demo: setup lab-images
	@started=$$(scripts/labd start | grep -c '^labd: running' || true); \
	$(DL) lab vms start $(LAB_VMS) && { \
	$(DL) run experiments/lab-demo.yaml; rc=$$?; \
	run=$$(ls -td results/*-lab-demo-* | head -1); \
	[ $$rc -eq 0 ] && $(DL) report $$run --out reports/out/lab-demo; rc2=$$?; \
	$(DL) lab vms stop $(LAB_VMS); }; \
	[ "$$started" = 1 ] && scripts/labd stop >/dev/null; [ $${rc:-1} -eq 0 ] && exit $$rc2; exit $${rc:-1}

lab-check: setup
	@test -n "$(INVENTORY)" || { echo "usage: make lab-check INVENTORY=hosts.ini [PATTERN=g]"; exit 2; }
	$(DL) lab check $(INVENTORY) --pattern '$(PATTERN)'

lab-prepare: setup
	@test -n "$(INVENTORY)" || { echo "usage: make lab-prepare INVENTORY=hosts.ini [PATTERN=g]"; exit 2; }
	$(DL) lab prepare $(INVENTORY) --pattern '$(PATTERN)'
