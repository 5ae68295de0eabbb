#!/usr/bin/env bash
# Build virtiofsd (the vhost-user-fs daemon the QEMU backend shares
# directories with) once with `cargo install`, cached outside the tree.
# Prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/common.sh
. "$here/lib/common.sh"

version=1.14.0
root=$KRUN_OCI_CACHE/virtiofsd-$version
if [ ! -x "$root/bin/virtiofsd" ]; then
  apt_ensure libcap-ng-dev libseccomp-dev pkg-config
  log "building virtiofsd $version (about 2 minutes)"
  cargo install --locked --quiet virtiofsd --version "$version" --root "$root" >&2
fi
echo "$root/bin/virtiofsd"
