#!/bin/sh
# Bake localdns into a node image (a Packer shell provisioner, or a chroot of the image
# tree): install the package and enable the unit. Never start it and never write cluster
# config: the image stays cluster-neutral, and each node's user-data (kubeadm-node.yaml,
# ubuntu-node.yaml, eks-al2023.mime) writes its cluster's drop-in at first boot.
#
#   image-bake.sh PACKAGE          a .deb or .rpm: a path, or an http(s) URL
#   image-bake.sh --repo           `localdns` from the package repositories already set up
#
# Packer:
#   provisioner "shell" {
#     script           = "cloud-init/image-bake.sh"
#     environment_vars = ["LOCALDNS_PACKAGE=https://downloads.example.com/localdns/0.1.0/localdns_0.1.0-1_amd64.deb"]
#   }
#
# Besides the package, one systemd drop-in:
# /etc/systemd/system/localdns.service.d/10-image.conf makes localdns wait for its cluster
# config: until a file exists in /etc/localdns/conf.d/ the unit is skipped at boot (a
# condition, not a failure), instead of starting on the package's config.toml, whose
# Service IP and cluster upstream are not this cluster's. The user-data's
# `systemctl restart localdns` starts it once the drop-in is written; later boots start it
# early, before kubelet, as usual.
set -eu

PACKAGE=${1:-${LOCALDNS_PACKAGE:-}}
UNIT=localdns.service
DROPIN_DIR=/etc/systemd/system/$UNIT.d

die() {
    echo "image-bake: $*" >&2
    exit 1
}

[ -n "$PACKAGE" ] || die "usage: $0 PACKAGE|--repo (a .deb or .rpm path or URL; or LOCALDNS_PACKAGE)"
[ "$(id -u)" = 0 ] || die "must run as root"

# Cluster config in the image would follow it onto every node of every cluster.
if ls /etc/localdns/conf.d/*.toml >/dev/null 2>&1; then
    die "/etc/localdns/conf.d/ has drop-ins ($(ls /etc/localdns/conf.d/)): cluster config does not belong in an image"
fi

tmp=
cleanup() { [ -z "$tmp" ] || rm -rf "$tmp"; }
trap cleanup EXIT
case "$PACKAGE" in
    http://* | https://*)
        tmp=$(mktemp -d)
        file="$tmp/${PACKAGE##*/}"
        curl -fsSL --retry 5 -o "$file" "$PACKAGE"
        PACKAGE=$file
        ;;
esac

if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    case "$PACKAGE" in
        --repo) apt-get -o DPkg::Lock::Timeout=300 install -y localdns ;;
        /*) apt-get -o DPkg::Lock::Timeout=300 install -y "$PACKAGE" ;;
        *) apt-get -o DPkg::Lock::Timeout=300 install -y "./$PACKAGE" ;;
    esac
elif command -v dnf >/dev/null; then
    [ "$PACKAGE" = --repo ] && PACKAGE=localdns
    dnf install -y "$PACKAGE"
elif command -v yum >/dev/null; then
    [ "$PACKAGE" = --repo ] && PACKAGE=localdns
    yum install -y "$PACKAGE"
else
    die "neither apt-get nor dnf nor yum found"
fi

mkdir -p "$DROPIN_DIR"
cat >"$DROPIN_DIR/10-image.conf" <<'CONF'
# Written by localdns's cloud-init/image-bake.sh: start only once the node's user-data
# has written its cluster config into /etc/localdns/conf.d/.
[Unit]
ConditionPathExistsGlob=/etc/localdns/conf.d/*.toml
CONF

# Enabled for the boots to come; works in a chroot too (no running systemd needed).
systemctl enable "$UNIT"

# Not started: in a chroot the package cannot start it, and on a live build machine its
# scripts start it only with a cluster upstream configured, which this script refuses.
# Should it run anyway, stop it: the image must not carry a running state or a last
# good config.
if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
    systemctl stop "$UNIT"
fi
rm -f /var/lib/localdns/last-good.toml
localdns --version
echo "image-bake: localdns installed and enabled, not started; no cluster config written"
