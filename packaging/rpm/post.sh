# %post of the localdns .rpm, written out by hand: cargo-generate-rpm does not expand the
# %systemd_post and %tmpfiles_create macros. $1 is the number of localdns packages
# installed once this one is: 1 on a fresh install, 2 or more on an upgrade (then the old
# package's %postun restarts the unit).
#   fresh install  enable by preset (50-localdns.preset says enable: RHEL's default preset
#                  disables everything); start only when the config names a cluster
#                  upstream, else say in one line that it is enabled but not started, and why
# Scriptlets never fail the transaction (|| :). Without a running systemd (image build,
# chroot) only the enablement links are written; the unit starts at the first boot.
unit=localdns.service
relay=localdns-fallback.service

# cargo-generate-rpm 0.21 cannot put an empty directory in the package (its `dir = true`
# assets fail: "No such file or directory"), so the drop-in directory that the .deb ships
# is made here; %postun removes it on erase when it is empty.
install -d -m 0755 /etc/localdns/conf.d || :
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset "$unit" "$relay" >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    systemd-tmpfiles --create localdns.conf >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ] && systemctl --quiet is-enabled "$unit"; then
        # An untouched config names no cluster upstream: a cache that sends cluster.local to
        # the node's resolvers would answer pods NXDOMAIN, so such a node is left for the admin.
        if why=$(LOCALDNS_LOG=error /usr/bin/localdns check-config --require-cluster-upstream \
            --config /etc/localdns/config.toml 2>&1 >/dev/null); then
            systemctl start "$unit" >/dev/null 2>&1 || :
        else
            echo "localdns: $unit is enabled but not started: ${why#localdns: }"
        fi
    fi
fi
:
