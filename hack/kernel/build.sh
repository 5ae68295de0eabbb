#!/usr/bin/env bash
# Build the guest kernel (vmlinux, booted through its PVH entry) from Debian's
# linux-source-6.1: tinyconfig plus hack/kernel/guest.config. The result is
# cached under $KRUN_OCI_CACHE/kernel/<hash of the config and source>/vmlinux,
# so a second run only prints the path. Prints the vmlinux path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"

apt_ensure linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils

fragment=$here/guest.config
tarball=$(ls /usr/src/linux-source-6.1.tar.xz)
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { cat "$fragment"; echo "linux-source-6.1 $srcver"; } | sha256sum | cut -c1-16)
out=$KRUN_OCI_CACHE/kernel/$key
if [ -f "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

src=$KRUN_OCI_CACHE/kernel/src-$srcver
if [ ! -f "$src/.extracted" ]; then
  log "unpacking linux-source $srcver"
  rm -rf "$src" && mkdir -p "$src"
  tar -xf "$tarball" -C "$src" --strip-components=1
  touch "$src/.extracted"
fi

build=$KRUN_OCI_CACHE/kernel/build-$key
mkdir -p "$build"
log "configuring guest kernel $key (tinyconfig + $(basename "$fragment"))"
make -s -C "$src" O="$build" tinyconfig >&2
cat "$fragment" >> "$build/.config"
make -s -C "$src" O="$build" olddefconfig >&2

# Every option the fragment asks for must have survived olddefconfig:
# a silently dropped option would give a kernel that boots but lacks a feature.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" "$build/.config" || { echo "guest.config: $line did not take effect" >&2; bad=1; } ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      if grep -q "^$opt=" "$build/.config"; then echo "guest.config: $opt should be off" >&2; bad=1; fi ;;
  esac
done < "$fragment"
[ $bad -eq 0 ] || die "kernel config does not match hack/kernel/guest.config (see above)"

log "building vmlinux with $(nproc) jobs (about 10-15 minutes on 2 cores)"
make -s -C "$src" O="$build" -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp "$build/vmlinux" "$build/.config" "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
rm -rf "$build"
echo "$out/vmlinux"
