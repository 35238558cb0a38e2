# %preun of the localdns .rpm (by hand, as %systemd_preun expands). $1 is 0 when the
# package is erased, 1 or more on an upgrade (nothing to do then: %postun restarts).
# On erase: disable, and stop, whose ExecStopPost hook removes the link and the rules so
# that DNS goes back through kube-proxy to kube-dns.
unit=localdns.service

if [ "$1" -eq 0 ]; then
    # The node's own resolver stops asking 169.254.20.10 first (if node-resolver enabled it).
    /usr/libexec/localdns/node-resolver disable || :
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now "$unit" >/dev/null 2>&1 || :
        # The relay goes last: until here it answered the link-local address.
        localdns fallback --removal-notice --config /etc/localdns/config.toml || :
        systemctl --no-reload disable --now localdns-fallback.service >/dev/null 2>&1 || :
    else
        systemctl --no-reload disable "$unit" localdns-fallback.service >/dev/null 2>&1 || :
    fi
fi
:
