# Shared helpers for hack/ scripts. Source, do not run.
# shellcheck shell=bash

# Where slow build products live, outside the tree, shared by clones.
KRUN_OCI_CACHE=${KRUN_OCI_CACHE:-/var/cache/krun-oci}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# apt_ensure PKG...: install the Debian packages that are missing, nothing else.
apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ ! -f /var/lib/apt/periodic/krun-oci-updated ] || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit)" ]; then
    apt-get update -q >&2
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/krun-oci-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# shell_scripts DIR: the shell scripts under DIR (a name ending in .sh, or
# an sh or bash #! line), one a line, sorted.
shell_scripts() {
  local f
  find "$1" -type f | LC_ALL=C sort | while IFS= read -r f; do
    if [[ $f == *.sh ]] || head -n 1 "$f" | grep -qE '^#!.*[/ ](ba)?sh$'; then
      printf '%s\n' "$f"
    fi
  done
}
