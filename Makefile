# Two entry points: `make run` (demo server) and `make test` (everything the tests need, then the suite).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Python 3.13 (ssl PSK callbacks): a second venv with the product only, for tls-creds-psk
PYTHON313 ?= $(or $(lastword $(wildcard $(HOME)/.pyenv/versions/3.1[3-9]*/bin/python3.1[3-9])),/usr/bin/python3.13)
VENV313 := .venv-py313
DEMO_DIR := demo
DEMO_IMG := $(DEMO_DIR)/disk.img
DEBIAN_RUN := qemu-utils libnbd-bin fuse3
DEBIAN_TEST := qemu-utils libnbd-bin python3-libnbd nbdkit fio fuse3 libfuse3-dev pkg-config openssl qemu-system-common iproute2

.PHONY: run test test-slow venv venv-py313 deps-run deps-test vm-harness demo-image clean

deps-run:
	@./scripts/apt-install $(DEBIAN_RUN)

deps-test:
	@./scripts/apt-install $(DEBIAN_TEST)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || (./scripts/apt-install python3-venv && $(PYTHON) -m venv $(VENV))
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@# python3-libnbd is a Debian package: let the venv see Debian's dist-packages (after its own).
	@echo /usr/lib/python3/dist-packages > $$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-dist-packages.pth
	@touch $@

venv: $(VENV)/.installed

# A missing Python 3.13 is an error here (make test needs it), not a skip.
$(VENV313)/.installed: pyproject.toml
	@test -x $(PYTHON313) || { echo "Python 3.13 not found at $(PYTHON313) (set PYTHON313=...): tls-creds-psk tests need it" >&2; exit 1; }
	$(PYTHON313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install -q --upgrade pip
	$(VENV313)/bin/python -m pip install -q -e '.[tls]'
	@touch $@

venv-py313: $(VENV313)/.installed

# The vhost-user-blk VM harness (tests/vhost_user_vm boots a guest on our export): its --setup
# installs qemu-system-x86, busybox-static and a Debian kernel (apt, as root).  Fast when done.
VUBC ?= $(abspath ../shared/harness/vhost-user-blk-check)
vm-harness:
	@if [ ! -x "$(VUBC)" ]; then \
		echo "vhost-user-blk VM harness not found at $(VUBC)" >&2; [ "$$CI" != true ] || exit 1; \
	elif command -v qemu-system-x86_64 >/dev/null && "$(VUBC)" --build-only >/dev/null 2>&1; then :; \
	else "$(VUBC)" --setup; fi

demo-image: venv
	@mkdir -p $(DEMO_DIR)
	@$(VPY) scripts/make-demo-image $(DEMO_IMG)

run: deps-run venv demo-image
	@echo
	@echo "Serving $(DEMO_IMG) on nbd://127.0.0.1:10809 (Ctrl-C to stop). Try, from another shell:"
	@echo "  nbdinfo nbd://127.0.0.1:10809"
	@echo "  qemu-img info nbd://127.0.0.1:10809"
	@echo "  nbdcopy nbd://127.0.0.1:10809 copy.img"
	@echo
	exec $(VENV)/bin/blockexport-nbd -f raw -b 127.0.0.1 -p 10809 -t -e 0 $(DEMO_IMG)

# -rs: list every skipped test with its reason; -n: the suite runs on TEST_JOBS processes
# (pytest-xdist; most tests wait on servers and clients, so two use two cores well)
TEST_JOBS ?= 2
test: deps-test venv venv-py313 vm-harness
	BLOCKEXPORT_VUBC=$(VUBC) $(VPY) -m pytest -q -rs -p no:cacheprovider -n $(TEST_JOBS) tests

# The slow tier only (tests marked `slow`: 10^6-input fuzzing per parser, ...; docs/testing.md)
test-slow: deps-test venv venv-py313 vm-harness
	BLOCKEXPORT_VUBC=$(VUBC) $(VPY) -m pytest -q -rs -p no:cacheprovider --slow -m slow tests

clean:
	rm -rf $(VENV) $(VENV313) $(DEMO_DIR) build src/*.egg-info
