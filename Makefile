# strata — two commands on a fresh Debian 12 machine, as root:
#   make demo   runs the main job end to end
#   make test   lints, type-checks and runs the test suite
# Both install what they need (Debian packages, a venv, the project) and are idempotent.

PYTHON ?= python3
VENV   := $(CURDIR)/.venv
PY     := $(VENV)/bin/python
# Where mount.fuse3 (which resets PATH) and containerd's snapshotter look for helpers.
SBIN   := /usr/local/sbin

# Debian packages: build deps of pyfuse3, the kernel-side tools, and the real clients
# the tests drive (peers, docker, podman, registry, a single-node Ceph cluster).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc patch attr psmisc e2fsprogs \
	fuse-overlayfs unionfs-fuse fio \
	docker.io podman docker-registry skopeo busybox-static iproute2 iputils-ping xfsprogs \
	libseccomp2 golang-github-containers-common \
	ceph-mon ceph-mgr ceph-osd ceph-mds ceph-fuse ceph-common

.PHONY: all deps venv install test lint demo bench clean
all: install

.stamp-apt: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

deps: .stamp-apt

$(PY):
	$(PYTHON) -m venv $(VENV)

# pyfuse3 with a small patch of ours (unionfs/pyfuse3.patch, its head says what each
# part does and what it measured): listings the kernel may cache, a main loop without
# trio, faster import. Built from PyPI's sdist; written so it can be offered upstream.
PYFUSE3_VERSION := 3.5.0
PYFUSE3_BUILD   := $(CURDIR)/build/pyfuse3
.stamp-pyfuse3: unionfs/pyfuse3.patch .stamp-apt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	rm -rf $(PYFUSE3_BUILD) && mkdir -p $(PYFUSE3_BUILD)
	$(PY) -m pip download -q --no-deps --no-binary pyfuse3 -d $(PYFUSE3_BUILD) pyfuse3==$(PYFUSE3_VERSION)
	tar -xzf $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION).tar.gz -C $(PYFUSE3_BUILD)
	patch -s -d $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION) -p1 < unionfs/pyfuse3.patch
	$(PY) -m pip install -q --force-reinstall --no-deps $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION)
	@touch $@

.stamp-venv: pyproject.toml .stamp-pyfuse3
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

install: .stamp-venv
	@ln -sf $(VENV)/bin/strata-unionfs $(SBIN)/strata-unionfs
	@ln -sf $(VENV)/bin/strata $(SBIN)/strata

lint: install
	$(VENV)/bin/ruff check common unionfs images volumes runtime plugin_api tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q tests

demo: install
	$(PY) -m runtime.demo

bench: install
	$(PY) -m benchmarks $(if $(FULL),--full,)

clean:
	rm -rf $(VENV) build .stamp-apt .stamp-pyfuse3 .stamp-venv
