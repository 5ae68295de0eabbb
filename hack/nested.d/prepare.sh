#!/usr/bin/env bash
# Prepare the boot files of the nested test host that hack/nested starts:
#
#   vmlinuz         Debian bookworm's cloud kernel (linux-image-cloud-amd64),
#                   taken with `apt-get download` + `dpkg-deb -x`, never
#                   installed on this machine
#   initramfs.cpio  busybox-static, the kernel modules the test host loads
#                   (with their dependencies, in insmod order) and
#                   hack/nested.d/init as /init
#   kernel.version  the kernel's release string, for messages
#   extra/          modules the test host does not load at boot, for a
#                   command that needs them to insmod itself: each file
#                   named in extra/load.list, in that order, unless
#                   /sys/module has it (see extra_modules below)
#
# Cached under $KRUN_OCI_CACHE/nested/<key>, where key is a hash of every
# input (kernel package and version, busybox version, module list, this
# script and the init script), so a second run only prints the directory.
# The downloaded .deb is kept in $KRUN_OCI_CACHE/nested/debs. Prints the
# directory on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"

# The modules the test host loads, by name. modprobe adds what they depend
# on. KVM (kvm_amd: TCG's `-cpu max` is an AMD CPU with SVM), the virtio-fs
# share of this machine's root (virtiofs over virtio-pci), and tun, so that
# the test host has the same /dev/fuse and /dev/net/tun as this machine;
# veth and the tc pieces (ingress qdisc, u32, mirred) that tests/net.rs wires
# and krun-oci redirects a network namespace's frames with; overlay, for the
# images of the podman and containerd suites' built-in VMM runs.
modules=(irqbypass kvm kvm_amd fuse virtio virtio_ring virtio_pci_modern_dev virtio_pci virtiofs tun veth sch_ingress cls_u32 act_mirred overlay)
# Modules loaded on demand, not at boot (each costs boot time, and most
# runs need none): what CRIU needs to dump and restore a runc container
# with a network namespace (hack/bench's checkpoint scenario): nf_tables
# (criu's kernel probe creates a table), nft_compat and xt_mark (its
# network lock, iptables over nftables), the socket diag modules (its
# socket collection) and nf_conntrack_netlink (its conntrack dump).
extra_modules=(nf_tables nft_compat xt_mark netlink_diag unix_diag inet_diag tcp_diag udp_diag af_packet_diag nf_conntrack_netlink)

meta=linux-image-cloud-amd64
init=$here/init
nested_cache=$KRUN_OCI_CACHE/nested

apt_ensure busybox-static cpio kmod
mkdir -p "$nested_cache"

# Several hack/nested runs may start at once (parallel tests): one prepares,
# the others wait for it and then find the result in the cache.
exec 9>"$nested_cache/.lock"
flock 9

# The kernel package the metapackage currently points at (bookworm's or
# bookworm-security's, whichever apt's candidate is), and its version. Asking
# apt takes seconds here, so the answer is remembered until the package
# lists change.
lists_stamp=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none)
resolved=$nested_cache/resolved
stamp='' pkg='' ver=''
[ -f "$resolved" ] && read -r stamp pkg ver < "$resolved"
if [ "$stamp" != "$lists_stamp" ] || [ -z "$pkg" ] || [ -z "$ver" ]; then
  if ! apt-cache show "$meta" >/dev/null 2>&1; then
    log "refreshing the package lists to find $meta"
    apt-get update -q >&2
    lists_stamp=$(stat -c %Y /var/lib/apt/lists)
  fi
  pkg=$(apt-cache depends "$meta" | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
  [ -n "$pkg" ] || die "cannot tell which kernel package $meta depends on"
  ver=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2; exit }')
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then die "no installable version of $pkg"; fi
  echo "$lists_stamp $pkg $ver" > "$resolved"
fi
bbver=$(dpkg-query -W -f='${Version}' busybox-static)

key=$( {
  echo "$pkg $ver"
  echo "busybox-static $bbver"
  echo "modules ${modules[*]}"
  echo "extra ${extra_modules[*]}"
  cat "$0" "$init"
} | sha256sum | cut -c1-16)
out=$nested_cache/$key
if [ -f "$out/initramfs.cpio" ] && [ -f "$out/vmlinuz" ]; then
  echo "$out"
  exit 0
fi

# Download (once per kernel version) and unpack into a scratch folder.
debs=$nested_cache/debs
deb=$debs/${pkg}_${ver}_amd64.deb
if [ ! -f "$deb" ]; then
  log "downloading $pkg $ver for the nested test host"
  mkdir -p "$debs"
  (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2)
  # apt writes an epoch's colon as %3a in the file name; settle on ours.
  got=$debs/${pkg}_${ver//:/%3a}_amd64.deb
  [ -f "$got" ] || die "apt-get download $pkg=$ver left no $got"
  [ "$got" = "$deb" ] || mv "$got" "$deb"
fi

work=$nested_cache/build-$key
rm -rf "$work" "$out.tmp"
trap 'rm -rf "$work" "$out.tmp"' EXIT
mkdir -p "$work/kernel" "$work/initramfs" "$out.tmp"
log "preparing the nested test host $key ($pkg $ver)"
dpkg-deb -x "$deb" "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
[ "$(echo "$kver" | wc -l)" -eq 1 ] || die "expected one kernel in $deb, found: $kver"
depmod -b "$work/kernel" "$kver"

# The insmod order: modprobe prints, for each module, its dependencies
# first. Keep the first occurrence of each file; skip built-ins.
mapfile -t kos < <(modprobe -a -d "$work/kernel" -S "$kver" --show-depends "${modules[@]}" \
  | awk '$1 == "insmod" && !seen[$2]++ { print $2 }')
[ ${#kos[@]} -gt 0 ] || die "modprobe found none of the modules ${modules[*]} in $pkg"

# The initramfs: /init, busybox, the modules flat in /lib/modules with
# load.list giving the order, and the directories and /dev/console node the
# kernel needs before /init has mounted anything.
ir=$work/initramfs
mkdir -p "$ir"/{bin,dev,proc,sys,newroot,lib/modules}
install -m 0755 /bin/busybox "$ir/bin/busybox"
ln -s busybox "$ir/bin/sh"
install -m 0755 "$init" "$ir/init"
mknod -m 0600 "$ir/dev/console" c 5 1
for ko in "${kos[@]}"; do
  cp "$ko" "$ir/lib/modules/"
  basename "$ko" >> "$ir/lib/modules/load.list"
done
(cd "$ir" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0) > "$out.tmp/initramfs.cpio"

# The extra modules (those the boot list already has left out), flat, with
# their insmod order.
mapfile -t extra < <(modprobe -a -d "$work/kernel" -S "$kver" --show-depends "${extra_modules[@]}" \
  | awk '$1 == "insmod" && !seen[$2]++ { print $2 }')
mkdir -p "$out.tmp/extra"
: > "$out.tmp/extra/load.list"
for ko in "${extra[@]}"; do
  [[ " ${kos[*]} " == *" $ko "* ]] && continue
  cp "$ko" "$out.tmp/extra/"
  basename "$ko" >> "$out.tmp/extra/load.list"
done

cp "$work/kernel/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
echo "$kver" > "$out.tmp/kernel.version"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
