# vfiod: build, install, uninstall.
#
#   make                          cargo build --release, then man pages and
#                                 shell completions generated from the code
#   make install [DESTDIR=...]    copies what `make` built and the files of
#                                 systemd/ and man/ to their places; never builds
#   make uninstall [DESTDIR=...]  removes exactly what `make install` copied
#   make deb                      a Debian package (cargo deb, after `make`)
#
# vfioctl is linked statically and without PIE (VFIOCTL_LINK=static, the
# default): it starts in about two thirds of the time, which a libvirt hook
# or a script that moves devices around every VM start waits for (BENCHMARKS.md,
# "Real kernel"). VFIOCTL_LINK=dynamic installs the ordinary PIE build.
#
# PREFIX=/usr is what systemd, D-Bus and polkit read by default; with
# PREFIX=/usr/local the units, the bus policy and the polkit action land in
# directories those may not read. The libvirt hook goes to SYSCONFDIR (/etc)
# whatever the PREFIX. PROFILE=debug (or any cargo profile) installs that
# build instead of the release one; BUILD_DIR overrides where it is.

PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
DOCDIR ?= $(DATADIR)/doc/vfiod
SYSCONFDIR ?= /etc
UNITDIR ?= $(LIBDIR)/systemd/system
MODULESLOADDIR ?= $(LIBDIR)/modules-load.d
DBUSPOLICYDIR ?= $(DATADIR)/dbus-1/system.d
DBUSSERVICEDIR ?= $(DATADIR)/dbus-1/system-services
POLKITACTIONDIR ?= $(DATADIR)/polkit-1/actions
LIBVIRTHOOKDIR ?= $(SYSCONFDIR)/libvirt/hooks/qemu.d
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR ?= $(DATADIR)/zsh/site-functions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d

CARGO ?= cargo
CARGO_FLAGS ?=
PROFILE ?= release
CARGO_TARGET_DIR ?= target
BUILD_DIR ?= $(CARGO_TARGET_DIR)/$(PROFILE)
# Generated man pages and completions (cargo deb's assets name them under
# target/release/dist).
DIST_DIR ?= $(BUILD_DIR)/dist
XTASK ?= $(BUILD_DIR)/xtask
INSTALL ?= install
VFIOCTL_LINK ?= static
HOST_TRIPLE := $(shell rustc -vV 2>/dev/null | sed -n 's/host: //p')
# The static build goes to its own target directory (cargo --target), so
# it never replaces the ordinary one; `make` copies it into DIST_DIR.
STATIC_RUSTFLAGS = $(RUSTFLAGS) -C target-feature=+crt-static -C relocation-model=static
ifeq ($(VFIOCTL_LINK),static)
VFIOCTL_BIN ?= $(DIST_DIR)/vfioctl
else
VFIOCTL_BIN ?= $(BUILD_DIR)/vfioctl
endif

# cargo calls the debug profile "dev" but its directory "debug".
cargo_profile = $(if $(filter debug,$(PROFILE)),dev,$(PROFILE))

# What `make install` reads, each checked before anything is copied.
built = $(BUILD_DIR)/vfiod $(VFIOCTL_BIN) \
	$(DIST_DIR)/man/vfiod.8 $(DIST_DIR)/man/vfioctl.1 \
	$(DIST_DIR)/completions/vfioctl.bash $(DIST_DIR)/completions/_vfioctl \
	$(DIST_DIR)/completions/vfioctl.fish

example_scripts = examples/vfiod-busctl examples/vfiod-dbus.py
examples = $(example_scripts) systemd/50-vfiod-vfio-group.rules.example \
	systemd/50-vfiod-one-profile.rules.example

.PHONY: all build static-vfioctl dist install uninstall deb clean-dist

all: build
	$(XTASK) dist $(DIST_DIR)

build:
	$(CARGO) build --profile $(cargo_profile) $(CARGO_FLAGS) -p vfiod -p vfioctl -p xtask
ifeq ($(VFIOCTL_LINK),static)
	$(MAKE) static-vfioctl
endif

# vfioctl alone, static and without PIE, copied to DIST_DIR/vfioctl.
static-vfioctl:
	RUSTFLAGS="$(STATIC_RUSTFLAGS)" $(CARGO) build --profile $(cargo_profile) $(CARGO_FLAGS) \
		--target $(HOST_TRIPLE) -p vfioctl
	$(INSTALL) -Dm755 $(CARGO_TARGET_DIR)/$(HOST_TRIPLE)/$(PROFILE)/vfioctl $(DIST_DIR)/vfioctl

# Man pages and completions from the built xtask (no cargo run).
dist:
	$(XTASK) dist $(DIST_DIR)

install:
	@for f in $(built); do \
		[ -e "$$f" ] || { echo "$$f is missing: run \`make\` (or make PROFILE=$(PROFILE)) first" >&2; exit 1; }; \
	done
	$(INSTALL) -Dm755 $(BUILD_DIR)/vfiod $(DESTDIR)$(BINDIR)/vfiod
	$(INSTALL) -Dm755 $(VFIOCTL_BIN) $(DESTDIR)$(BINDIR)/vfioctl
	$(INSTALL) -Dm644 systemd/vfiod.service $(DESTDIR)$(UNITDIR)/vfiod.service
	sed -i 's|^\(Exec[A-Za-z]*=\)/usr/bin/vfiod|\1$(BINDIR)/vfiod|' $(DESTDIR)$(UNITDIR)/vfiod.service
	$(INSTALL) -Dm644 systemd/vfio-pci.conf $(DESTDIR)$(MODULESLOADDIR)/vfio-pci.conf
	$(INSTALL) -Dm644 systemd/org.vfiod1.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.vfiod1.conf
	$(INSTALL) -Dm644 systemd/org.vfiod1.service $(DESTDIR)$(DBUSSERVICEDIR)/org.vfiod1.service
	$(INSTALL) -Dm644 systemd/org.vfiod1.policy $(DESTDIR)$(POLKITACTIONDIR)/org.vfiod1.policy
	$(INSTALL) -Dm755 systemd/vfiod-libvirt-hook $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiod
	sed -i 's|/usr/bin/vfioctl|$(BINDIR)/vfioctl|' $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiod
	$(INSTALL) -Dm644 $(DIST_DIR)/man/vfiod.8 $(DESTDIR)$(MANDIR)/man8/vfiod.8
	$(INSTALL) -Dm644 -t $(DESTDIR)$(MANDIR)/man1 $(DIST_DIR)/man/vfioctl.1 $(DIST_DIR)/man/vfioctl-*.1
	$(INSTALL) -Dm644 man/vfiod.toml.5 $(DESTDIR)$(MANDIR)/man5/vfiod.toml.5
	$(INSTALL) -Dm644 $(DIST_DIR)/completions/vfioctl.bash $(DESTDIR)$(BASHCOMPDIR)/vfioctl
	$(INSTALL) -Dm644 $(DIST_DIR)/completions/_vfioctl $(DESTDIR)$(ZSHCOMPDIR)/_vfioctl
	$(INSTALL) -Dm644 $(DIST_DIR)/completions/vfioctl.fish $(DESTDIR)$(FISHCOMPDIR)/vfioctl.fish
	$(INSTALL) -Dm755 -t $(DESTDIR)$(DOCDIR)/examples $(example_scripts)
	$(INSTALL) -Dm644 -t $(DESTDIR)$(DOCDIR)/examples systemd/50-vfiod-vfio-group.rules.example \
		systemd/50-vfiod-one-profile.rules.example

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vfiod $(DESTDIR)$(BINDIR)/vfioctl
	rm -f $(DESTDIR)$(UNITDIR)/vfiod.service
	rm -f $(DESTDIR)$(MODULESLOADDIR)/vfio-pci.conf
	rm -f $(DESTDIR)$(DBUSPOLICYDIR)/org.vfiod1.conf
	rm -f $(DESTDIR)$(DBUSSERVICEDIR)/org.vfiod1.service
	rm -f $(DESTDIR)$(POLKITACTIONDIR)/org.vfiod1.policy
	rm -f $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiod
	rm -f $(DESTDIR)$(MANDIR)/man8/vfiod.8 $(DESTDIR)$(MANDIR)/man5/vfiod.toml.5
	rm -f $(DESTDIR)$(MANDIR)/man1/vfioctl.1 $(DESTDIR)$(MANDIR)/man1/vfioctl-*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/vfioctl $(DESTDIR)$(ZSHCOMPDIR)/_vfioctl
	rm -f $(DESTDIR)$(FISHCOMPDIR)/vfioctl.fish
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/examples/,$(notdir $(examples)))
	rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) 2>/dev/null || true

# Needs cargo-deb (cargo install cargo-deb) and a release `make` first.
deb:
	$(CARGO) deb -p vfiod --no-build

clean-dist:
	rm -rf $(DIST_DIR)
