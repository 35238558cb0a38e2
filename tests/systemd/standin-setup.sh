#!/bin/sh
# Test stand-in for a localdns build without the `setup` and `teardown` commands: installed
# as /usr/bin/localdns in the test container, with the real binary beside it. `setup` and
# `teardown` do with ip(8) and iptables(8) what the real commands do (an ifb link, as this
# kernel has no dummy, holding the listen addresses; raw-table NOTRACK rules), inside the
# unit's sandbox; every other command runs the real binary under the same PID (exec).
# Removed from the tests as soon as the real commands are merged: tests/systemd.rs uses the
# real binary whenever `localdns setup --help` works.
set -eu
real=/usr/lib/localdns-test/localdns
link=nodelocaldns
addresses="@ADDRESSES@"

rules() { # $1: -A or -D
    for a in $addresses; do
        for p in udp tcp; do
            iptables -w -t raw "$1" PREROUTING -d "$a" -p "$p" --dport 53 -j NOTRACK
            iptables -w -t raw "$1" OUTPUT -s "$a" -p "$p" --sport 53 -j NOTRACK
        done
    done
}

case "${1:-}" in
setup)
    echo "stand-in setup (this localdns build has no setup command)"
    ip link show "$link" >/dev/null 2>&1 || ip link add "$link" type dummy 2>/dev/null ||
        ip link add "$link" type ifb
    for a in $addresses; do ip addr replace "$a/32" dev "$link"; done
    ip link set "$link" up
    for a in $addresses; do
        iptables -w -t raw -C PREROUTING -d "$a" -p udp --dport 53 -j NOTRACK 2>/dev/null && exit 0
    done
    rules -A
    ;;
teardown)
    echo "stand-in teardown (this localdns build has no teardown command)"
    rules -D 2>/dev/null || true
    ip link del "$link" 2>/dev/null || true
    ;;
*) exec "$real" "$@" ;;
esac
