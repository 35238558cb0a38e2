# %postun of the localdns .rpm (by hand, as %systemd_postun_with_restart expands). $1 is
# 0 after an erase, 1 or more after an upgrade, when this (the old) package's scriptlet
# runs after the new package's %post.
#   upgrade  hand the running daemon over to the new binary (`localdns handover`), or
#            restart it when that cannot be done (the fd store keeps the listening
#            sockets: the restart loses no query); a stopped unit stays stopped
#   erase    delete localdns's state and run files, and the directories that rpm does
#            not own (cargo-generate-rpm 0.21 writes no directory entries) once empty;
#            rpm itself keeps an edited config.toml as config.toml.rpmsave
unit=localdns.service

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        # Hand the running daemon over to the new binary (no gap, the cache kept); restart
        # one too old to hand over, or when the hand-over does not happen.
        if ! systemctl --quiet is-active "$unit" || ! /usr/bin/localdns handover >/dev/null 2>&1; then
            systemctl try-restart "$unit" >/dev/null 2>&1 || :
        fi
        systemctl try-restart localdns-fallback.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/localdns /run/localdns
    rmdir /etc/localdns/conf.d /etc/localdns /usr/libexec/localdns /usr/share/doc/localdns \
        /usr/share/licenses/localdns \
        2>/dev/null || :
fi
:
