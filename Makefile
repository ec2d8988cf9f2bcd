# strata — two commands on a fresh Debian 12 machine, as root:
#   make demo   runs the main job end to end
#   make test   lints, type-checks and runs the test suite
# Both install what they need (Debian packages, a venv, the project) and are idempotent.

PYTHON ?= python3
VENV   := $(CURDIR)/.venv
PY     := $(VENV)/bin/python
# Where mount(8), mount.fuse3 and containerd find strata-unionfs: a system directory on
# every PATH they run with.
SBIN   := /usr/local/sbin

# Debian packages: build deps of pyfuse3, the kernel-side tools, and the real clients
# the tests drive (peers, docker, podman, registry, a single-node Ceph cluster).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc patch attr psmisc e2fsprogs \
	fuse-overlayfs unionfs-fuse fio \
	docker.io podman docker-registry skopeo busybox-static iproute2 iputils-ping xfsprogs \
	libseccomp2 golang-github-containers-common \
	meson ninja-build curl ca-certificates \
	containerd golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev \
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

# libfuse 3.17 from Debian's source (trixie's fuse3 package, checked against the
# sha256 its .dsc lists): FUSE passthrough needs libfuse >= 3.17 and Debian 12 has
# 3.14. Built into build/libfuse (library only); the system's libfuse is untouched
# and only our pyfuse3 links to this one (by rpath). IGNORE_MTAB: /etc/mtab is a
# link to /proc/self/mounts, yet libfuse ran `mount -f` after every mount to
# "update" it, ~5 ms of each.
LIBFUSE_VERSION := 3.17.2
LIBFUSE_SHA256  := 3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
LIBFUSE_URL     := https://deb.debian.org/debian/pool/main/f/fuse3/fuse3_$(LIBFUSE_VERSION).orig.tar.gz
LIBFUSE         := $(CURDIR)/build/libfuse
LIBFUSE_SRC     := $(CURDIR)/build/libfuse-src
.stamp-libfuse: .stamp-apt
	rm -rf $(LIBFUSE) $(LIBFUSE_SRC) && mkdir -p $(LIBFUSE_SRC)
	curl -fsSL --retry 3 -o $(LIBFUSE_SRC).tar.gz $(LIBFUSE_URL)
	echo "$(LIBFUSE_SHA256)  $(LIBFUSE_SRC).tar.gz" | sha256sum -c --quiet
	tar -xzf $(LIBFUSE_SRC).tar.gz -C $(LIBFUSE_SRC) --strip-components=1
	cd $(LIBFUSE_SRC) && meson setup _build --prefix=$(LIBFUSE) --libdir=lib -Dexamples=false \
		-Dutils=false -Dtests=false -Ddisable-mtab=true -Dc_args=-DIGNORE_MTAB >/dev/null && \
		ninja -C _build install >/dev/null
	@touch $@

# pyfuse3 with a small patch of ours (unionfs/pyfuse3.patch, its head says what each
# part does and what it measured): listings the kernel may cache, a main loop without
# trio, faster import, handlers inline until they detach, passthrough. Built from
# PyPI's sdist against the libfuse above; written so it can be offered upstream.
PYFUSE3_VERSION := 3.5.0
PYFUSE3_BUILD   := $(CURDIR)/build/pyfuse3
.stamp-pyfuse3: unionfs/pyfuse3.patch .stamp-libfuse | $(PY)
	$(PY) -m pip install -q --upgrade pip
	rm -rf $(PYFUSE3_BUILD) && mkdir -p $(PYFUSE3_BUILD)
	$(PY) -m pip download -q --no-deps --no-binary pyfuse3 -d $(PYFUSE3_BUILD) pyfuse3==$(PYFUSE3_VERSION)
	tar -xzf $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION).tar.gz -C $(PYFUSE3_BUILD)
	patch -s -d $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION) -p1 < unionfs/pyfuse3.patch
	PKG_CONFIG_PATH=$(LIBFUSE)/lib/pkgconfig LDFLAGS=-Wl,-rpath,$(LIBFUSE)/lib \
		$(PY) -m pip install -q --force-reinstall --no-deps $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION)
	@touch $@

.stamp-venv: pyproject.toml .stamp-pyfuse3
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

# containerd's snapshots gRPC API: Python stubs generated from Debian's .proto files
# (golang-github-containerd-containerd-dev) into the git-ignored plugin_api/_proto.
.stamp-proto: plugin_api/protogen.py .stamp-venv
	$(PY) -m plugin_api.protogen
	@touch $@

# strata-unionfs: a small C program (unionfs/launcher.c) that hands the mount to the
# resident mount service in a millisecond; when it cannot, the Python launcher
# (unionfs/launch.py, run with `python -IS`) mounts by itself and starts the service.
LAUNCHER    := $(VENV)/bin/strata-unionfs
LAUNCHER_PY := $(VENV)/bin/strata-unionfs.py
install: .stamp-venv .stamp-proto
	@printf '#!%s -IS\nimport sys\nsys.path.insert(0, "%s")\nfrom unionfs.launch import main\nsys.exit(main())\n' \
		'$(PY)' '$(CURDIR)' > $(LAUNCHER_PY).tmp && chmod 755 $(LAUNCHER_PY).tmp && mv $(LAUNCHER_PY).tmp $(LAUNCHER_PY)
	@sock=$$($(PY) -IS -c 'import sys; sys.path.insert(0, "$(CURDIR)"); \
		from unionfs.launch import socket_path; print(socket_path())') && \
		gcc -O2 -Wall -Wextra -Werror -o $(LAUNCHER).tmp -DSOCKET_PATH="\"$$sock\"" \
		-DFALLBACK="\"$(LAUNCHER_PY)\"" unionfs/launcher.c && mv $(LAUNCHER).tmp $(LAUNCHER)
	@ln -sf $(VENV)/bin/strata-unionfs $(SBIN)/strata-unionfs
	@ln -sf $(VENV)/bin/strata $(SBIN)/strata
	@# Byte-compiled now, as pip does for a normal install: an editable one leaves it to the
	@# first run, which cannot write them where PYTHONDONTWRITEBYTECODE is set (~30 ms a command).
	@$(PY) -m compileall -q -j0 common unionfs images volumes plugin_api runtime benchmarks

lint: install
	$(VENV)/bin/ruff check common unionfs images volumes runtime plugin_api tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q tests

demo: install
	$(PY) -m runtime.demo

bench: install
	$(PY) -m benchmarks $(if $(FULL),--full,)
	$(PY) -m benchmarks.run_latency -n $(if $(FULL),20,5)
	$(PY) -m benchmarks.graphdriver $(if $(FULL),,--quick)
	$(PY) -m benchmarks.snapshotter $(if $(FULL),,--quick)

clean:
	rm -rf $(VENV) build plugin_api/_proto .stamp-apt .stamp-libfuse .stamp-pyfuse3 .stamp-venv .stamp-proto
