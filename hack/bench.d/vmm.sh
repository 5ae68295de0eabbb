# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, out, work, rounds...
# vmm            the built-in VMM against the QEMU backend, both on real KVM:
#                this machine's kvm-pvm cannot boot a Linux guest, so the
#                whole scenario runs in one `hack/nested` test host (TCG, so
#                absolute times are slow; compare the two side by side).
#                Rounds are min(-n, KRUN_OCI_BENCH_VMM_ROUNDS, default 3),
#                backends interleaved, after one discarded warm-up round:
#                - host-side overhead of `true` in a busybox bundle, from
#                  the kernel's trace events: krun-oci's exec -> vCPU 0's
#                  first KVM entry (the guest's first instruction), and the
#                  guest's shutdown exit (KVM_EXIT_SHUTDOWN) -> krun-oci's
#                  exit;
#                - VmHWM, Pss, and Pss beyond the guest RAM pages touched,
#                  of every host process of an idle `sleep` container;
#                - virtio-fs: sequential write (dd conv=fsync) and read of a
#                  KRUN_OCI_BENCH_FS_MIB file (default 256: ~5 MB/s under
#                  nested TCG) and create, stat, delete of
#                  KRUN_OCI_BENCH_FS_FILES small files (default 1000), in the
#                  container (rootfs on disk) and natively in the test host
#                  on the same folder; KRUN_OCI_BENCH_VMM_FS_ROUNDS rounds
#                  (default 1).
#                builtin starts each VM from a template (built in the
#                warm-up round), builtin-cold boots it (--no-template).
#                With KRUN_OCI_BASE (see above) the backends are builtin,
#                builtin-cold, qemu, builtin@base and qemu@base, interleaved, the @base
#                ones run by KRUN_OCI_BASE's krun-oci; a column each.
#                Writes vmm-overhead.tsv, vmm-memory.tsv, vmm-fs.tsv,
#                vmm-logs/ and vmm.png to DIR.

all_scenarios+=(vmm)

# BACKEND@base: the backend of the build in KRUN_OCI_BASE (before a change).
vmm_backends=(builtin builtin-cold qemu)
[ -z "${KRUN_OCI_BASE:-}" ] || vmm_backends=(builtin builtin-cold qemu builtin@base qemu@base)

# ---------------------------------------------------------------------------
# Outside: run the inner part in one test host, then report.

scenario_vmm() {
  local r fs_rounds fs_mib fs_files budget t0 rc=0 k=${#vmm_backends[@]}
  r=$((rounds < ${KRUN_OCI_BENCH_VMM_ROUNDS:-3} ? rounds : ${KRUN_OCI_BENCH_VMM_ROUNDS:-3}))
  fs_rounds=${KRUN_OCI_BENCH_VMM_FS_ROUNDS:-1}
  fs_mib=${KRUN_OCI_BENCH_FS_MIB:-256}
  fs_files=${KRUN_OCI_BENCH_FS_FILES:-1000}
  [[ $r =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_VMM_ROUNDS wants a positive number"
  [[ $fs_rounds =~ ^[0-9]+$ ]] || die "KRUN_OCI_BENCH_VMM_FS_ROUNDS wants a number"
  [[ $fs_mib =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_FS_MIB wants a positive number of MiB"
  [[ $fs_files =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_FS_FILES wants a positive number"
  vmm_rounds=$r
  "$here/mkbundle" "$bundles/vmm-true" true
  "$here/mkbundle" "$bundles/vmm-sleep" sleep 3600
  "$here/mkbundle" "$bundles/vmm-fs" sh /vmm-fs.sh
  vmm_fs_script >"$bundles/vmm-fs/rootfs/vmm-fs.sh"
  rm -rf "$out/vmm-logs" "$out"/vmm-*.tsv
  mkdir -p "$out/vmm-logs"
  # A generous limit: ~60 s a round for overhead and memory, and the file
  # system at a pessimistic 1 MB/s and 50 ms a file operation (for two
  # backends; more take longer).
  budget=$((300 + ((r + 1) * 120 + fs_rounds * (120 + fs_mib * 3 * 2 + fs_files * 3 * 3 / 20)) * k / 2))
  log "vmm: ${vmm_backends[*]} in a nested test host: 1 warm-up + $r rounds; fs: $fs_rounds round(s), $fs_mib MiB, $fs_files files (limit $budget s)"
  t0=$EPOCHSECONDS
  "$here/nested" run --timeout "$budget" -- \
    bash "$here/bench.d/vmm.sh" inner "$KRUN_OCI" "$out" "$bundles" "$work/vmm" "$r" "$fs_rounds" "$fs_mib" "$fs_files" \
    "$KRUN_OCI_BASE" "${krun_libdir:-}" || rc=$?
  vmm_wall=$((EPOCHSECONDS - t0))
  [ "$rc" -eq 0 ] || log "vmm: the test host run failed (exit $rc); reporting what was measured"
  rm -rf "$bundles/vmm-fs/rootfs/vmm-data"
}

# ms_of T_SECONDS: "%.3f" ms from a number of seconds.
vmm_fmt() { awk -v v="$1" 'BEGIN { if (v == "NA" || v == "") print "NA"; else printf "%.1f", v }'; }

# vmm_col FILE COLUMN KEYCOL KEY [KEYCOL2 KEY2]: COLUMN of rows whose KEYCOL
# is KEY (and KEYCOL2 is KEY2), round > 0, status ok.
vmm_col() {
  awk -F'\t' -v c="$2" -v k="$3" -v kv="$4" -v k2="${5:-}" -v kv2="${6:-}" '
    NR == 1 { for (i = 1; i <= NF; i++) h[$i] = i; next }
    $h[k] == kv && (k2 == "" || $h[k2] == kv2) && (!("round" in h) || $h["round"] > 0) &&
      (!("status" in h) || $h["status"] == "ok") && $h[c] ~ /^-?[0-9.]+$/ { print $h[c] }' "$1"
}

# vmm_cell NUMBERS...: "median (min-max)" of stdin.
vmm_cell() {
  local n med min max
  read -r n med min max < <(stats)
  if [ "$n" -eq 0 ]; then echo "-"; elif [ "$n" -eq 1 ]; then echo "$med"; else echo "$med ($min-$max)"; fi
}

# vmm_fmt_cols WIDTH0 WIDTH N: a printf format, a WIDTH0 column and N of WIDTH.
vmm_fmt_cols() {
  local i f="  %-$1s"
  for ((i = 0; i < $3; i++)); do f+=" %-$2s"; done
  printf '%s\\n\n' "$f"
}

report_vmm() {
  local f=$out/vmm-overhead.tsv row name col b cells fmt
  fmt=$(vmm_fmt_cols 48 22 "${#vmm_backends[@]}")
  echo "Built-in VMM vs QEMU backend (issue #3), both on real KVM inside a nested test host"
  echo "(QEMU/TCG, 1 CPU: every number is far slower than on a real KVM host, compare side by side)."
  if [ -n "${KRUN_OCI_BASE:-}" ]; then
    echo "BACKEND@base: the build in $KRUN_OCI_BASE (before the change), run as"
    echo "env KRUN_OCI_LIBDIR=$KRUN_OCI_BASE/lib/krun-oci $KRUN_OCI_BASE/bin/krun-oci; the others: $KRUN_OCI"
    echo "through env with KRUN_OCI_LIBDIR=${krun_libdir:-?}."
  fi
  echo "Wall time of the scenario ${vmm_wall:-?} s."
  if [ ! -s "$f" ]; then
    echo "  no results (see the messages above)"
    return 0
  fi
  echo
  echo "Host-side overhead: \`true\` in a busybox bundle, VM 1 vCPU 512 MiB; ${vmm_rounds:-?} rounds"
  echo "after a warm-up round, backends interleaved; ms, median (min-max); moments from the test"
  echo "host's kernel trace events (clock mono):"
  echo
  # shellcheck disable=SC2059 # the format is built for the backends
  printf "$fmt" "" "${vmm_backends[@]}"
  for row in \
    "exec krun-oci -> first KVM entry (guest starts)|pre_ms" \
    "  of which exec -> VMM process exec|vmm_exec_ms" \
    "guest shutdown exit -> krun-oci exits|post_ms" \
    "host-side overhead (sum; target <= 10 ms)|overhead_ms" \
    "first KVM entry -> shutdown exit (guest)|guest_ms" \
    "wall time (bench's clock, fork to reap)|wall_ms" \
    "runtime log: host_setup_ms|host_setup_ms" \
    "runtime log: start -> guest clock zero|kernel_zero_ms" \
    "runtime log: teardown_ms|teardown_ms"; do
    IFS='|' read -r name col <<<"$row"
    cells=()
    for b in "${vmm_backends[@]}"; do cells+=("$(vmm_col "$f" "$col" backend "$b" | vmm_cell)"); done
    # shellcheck disable=SC2059
    printf "$fmt" "$name" "${cells[@]}"
  done
  awk -F'\t' 'NR > 1 && $4 != "ok" { printf "  failed: %s round %s: %s\n", $2, $1, $NF }' "$f"
  echo
  echo "  guest starts: vCPU 0's first kvm_entry event. For the built-in VMM booting that is the"
  echo "  kernel's PVH entry, from a template the restored guest's next instruction; QEMU's"
  echo "  microvm first runs its qboot firmware, which loads the kernel, so that firmware time is"
  echo "  guest time here. shutdown exit: the kvm_userspace_exit event with KVM_EXIT_SHUTDOWN"
  echo "  (guest-init's reboot with reboot=t triple-faults). krun-oci exits: its main thread's"
  echo "  sched_process_exit. VMM process exec: the sched_process_exec of qemu, or of the"
  echo "  built-in VMM (krun-oci execs itself, /proc/self/exe). Every krun-oci build runs from a"
  echo "  copy in the test host's tmpfs (over virtio-fs the test host rereads a binary at each"
  echo "  exec: see vmm_inner); qemu runs from this machine's /usr. runtime log: the --debug"
  echo "  \"timings\" and \"VM stopped\" lines, on krun-oci's own clock, which starts in main(),"
  echo "  after the exec and the loading of the binary; guest clock zero = host_setup_ms +"
  echo "  vmm_start_ms, when the guest kernel's clock read 0 (kvm-clock set-up, early in boot)."
  echo
  report_vmm_memory
  echo
  report_vmm_fs
}

report_vmm_memory() {
  local f=$out/vmm-memory.tsv
  [ -s "$f" ] || { echo "Memory: no results."; return 0; }
  echo "Memory of one idle container (\`sleep\`, VM 512 MiB), every host process of it (krun-oci"
  echo "and its descendants), sampled 3 s after it is running; MiB, median (min-max) over rounds."
  echo "guest RAM = the guest memory mapping in /proc/PID/smaps (built-in: the anonymous mapping of"
  echo "the guest's size, or from a template its private mapping of the template file, whose clean"
  echo "pages clones share; QEMU: its memfd RAM block, which virtiofsd maps too, counting there only"
  echo "the pages it touched itself); its Pss is the guest pages touched. beyond guest = Pss - guest RAM Pss (target <= 16 MiB)."
  echo
  awk -F'\t' -v order="${vmm_backends[*]}" '
    NR == 1 { for (i = 1; i <= NF; i++) h[$i] = i; next }
    $h["round"] > 0 && $h["pid"] != "-" {
      b = $h["backend"]; r = $h["round"]
      hwm[b, r] += $h["vmhwm_kb"]; pss[b, r] += $h["pss_kb"]; g[b, r] += $h["guest_pss_kb"]
      rs[b, r] = 1; if (r > last[b]) last[b] = r
    }
    function med(a, n,   i, j, t) {
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function cell(n, a,   m) { if (n == 0) return "-"; m = med(a, n); return n == 1 ? sprintf("%.1f", m / 1024) : sprintf("%.1f (%.1f-%.1f)", m / 1024, a[1] / 1024, a[n] / 1024) }
    END {
      k = split(order, bs, " ")
      line = sprintf("  %-34s", "")
      for (j = 1; j <= k; j++) line = line sprintf(" %-22s", bs[j])
      print line
      split("VmHWM sum|Pss total|guest RAM Pss (touched)|Pss beyond guest RAM", names, "|")
      for (m = 1; m <= 4; m++) {
        line = sprintf("  %-34s", names[m])
        for (j = 1; j <= k; j++) {
          b = bs[j]; n = 0; delete v
          for (key in rs) { split(key, p, SUBSEP); if (p[1] != b) continue
            x = m == 1 ? hwm[key] : m == 2 ? pss[key] : m == 3 ? g[key] : pss[key] - g[key]
            v[++n] = x }
          line = line sprintf(" %-22s", cell(n, v))
        }
        print line
      }
    }' "$f"
  echo
  echo "  per process, last round (MiB):"
  awk -F'\t' '
    NR == 1 { for (i = 1; i <= NF; i++) h[$i] = i; next }
    { r = $h["round"]; b = $h["backend"]; if (r > last[b]) last[b] = r; rows[NR] = $0 }
    END {
      printf "    %-12s %-26s %8s %8s %10s %8s\n", "backend", "process (pid)", "VmHWM", "Pss", "guest Pss", "beyond"
      for (i = 2; i <= NR; i++) {
        split(rows[i], f, "\t")
        if (f[h["round"]] != last[f[h["backend"]]]) continue
        if (f[h["pid"]] == "-") { printf "    %-12s %s\n", f[h["backend"]], f[h["process"]]; continue }
        printf "    %-12s %-26s %8.1f %8.1f %10.1f %8.1f\n", f[h["backend"]], f[h["process"]] " (" f[h["pid"]] ")",
          f[h["vmhwm_kb"]] / 1024, f[h["pss_kb"]] / 1024, f[h["guest_pss_kb"]] / 1024, (f[h["pss_kb"]] - f[h["guest_pss_kb"]]) / 1024
      }
    }' "$f"
}

report_vmm_fs() {
  local f=$out/vmm-fs.tsv op unit t cells fmt
  fmt=$(vmm_fmt_cols 26 20 $((${#vmm_backends[@]} + 1)))
  [ -s "$f" ] || { echo "virtio-fs: no results."; return 0; }
  echo "virtio-fs, the container's rootfs ($bundles/vmm-fs/rootfs, this machine's disk, which the"
  echo "test host itself reaches over its own virtio-fs) against the same folder natively in the"
  echo "test host; $(awk -F'\t' 'NR > 1 && $3 == "write" { print $6 / 1048576; exit }' "$f") MiB file, $(awk -F'\t' 'NR > 1 && $3 == "create" { print $6; exit }' "$f") small files; median (min-max) of $(awk -F'\t' 'NR > 1 { if ($1 > m) m = $1 } END { print m + 0 }' "$f") round(s):"
  echo
  # shellcheck disable=SC2059 # the format is built for the backends
  printf "$fmt" "" "${vmm_backends[@]}" native
  for op in "write|MB/s" "read|MB/s" "write|s" "read|s" "create|s" "stat|s" "delete|s" "create|files/s"; do
    IFS='|' read -r op unit <<<"$op"
    cells=()
    for t in "${vmm_backends[@]}" native; do
      cells+=("$(awk -F'\t' -v t="$t" -v op="$op" -v u="$unit" '
        NR > 1 && $2 == t && $3 == op && $4 == "ok" && $5 > 0 {
          print u == "s" ? $5 : u == "MB/s" ? $6 / $5 / 1e6 : $6 / $5 }' "$f" | vmm_cell)")
    done
    # shellcheck disable=SC2059
    printf "$fmt" "$op ($unit)" "${cells[@]}"
  done
  awk -F'\t' 'NR > 1 && $4 != "ok" { printf "  failed: %s %s round %s: %s\n", $2, $3, $1, $NF }
    NR > 1 && $4 == "ok" && $7 != "" { printf "  %s %s round %s %s\n", $2, $3, $1, $7 }' "$f"
  echo
  echo "  write: dd if=/dev/zero bs=1M conv=fsync (the fsync reaches the disk through both"
  echo "  virtio-fs layers). read: dd of=/dev/null bs=1M in a fresh VM (cold guest page cache),"
  echo "  after dropping the test host's page cache (echo 3 > drop_caches there; this machine's"
  echo "  page cache under the test host is shared and left alone); no O_DIRECT. Small files:"
  echo "  busybox sh loops, \`echo x > f\$i\`, \`[ -f f\$i ]\`, then \`rm -rf\` of the folder."
  echo "  Times from /proc/uptime (10 ms resolution) in the guest resp. the test host; MB = 10^6 B."
}

plot_vmm() {
  local f=$out/vmm-overhead.tsv gp=$out/vmm.gp k=${#vmm_backends[@]}
  [ -s "$f" ] || return 0
  {
    for b in "${vmm_backends[@]}"; do
      printf '%s\t%s\t%s\t%s\n' "$b" \
        "$(vmm_col "$f" pre_ms backend "$b" | stats | cut -d' ' -f2)" \
        "$(vmm_col "$f" post_ms backend "$b" | stats | cut -d' ' -f2)" \
        "$(awk -F'\t' -v b="$b" 'NR > 1 && $1 > 0 && $2 == b && $3 != "-" { p[$1] += $6 - $7 } END { for (r in p) print p[r] / 1024 }' "$out/vmm-memory.tsv" 2>/dev/null | stats | cut -d' ' -f2)"
    done
  } >"$out/plot-vmm.dat"
  {
    echo "set terminal pngcairo size $((800 + 100 * k)),520 font \"DejaVu Sans,11\" noenhanced"
    echo "set output \"$out/vmm.png\""
    echo "set multiplot layout 1,2 title \"$(if [ "$k" -gt 2 ]; then echo "built-in VMM vs QEMU, before (@base) and after"; else echo "built-in VMM vs QEMU"; fi), nested test host (TCG), $(date -u '+%Y-%m-%d')\""
    # shellcheck disable=SC2028 # gnuplot reads the \t
    echo "set datafile separator \"\\t\"; set style data histograms; set style fill solid 0.7 border -1"
    echo "set grid ytics; set yrange [0:*]; set key top left; set xrange [-0.6:$((k - 1)).6]; set boxwidth 0.6; set offsets 0, 0, graph 0.25, 0"
    echo "set title \"host-side overhead (median ms)\"; set style histogram rowstacked"
    echo "plot 'plot-vmm.dat' using 2:xtic(1) title 'exec -> first KVM entry', '' using 3 title 'shutdown -> exit'"
    echo "set title \"Pss beyond guest RAM (median MiB)\"; set style histogram clustered"
    echo "plot 'plot-vmm.dat' using 4:xtic(1) title 'Pss - guest RAM Pss'"
    echo "unset multiplot"
  } >"$gp"
  (cd "$out" && gnuplot vmm.gp) || log "gnuplot failed on $gp"
  echo "plot: $out/vmm.png"
}

# The workload of the file-system runs, written into the bundle's rootfs:
# sh /vmm-fs.sh [ROOT] with ROOT/vmm-fs.args holding "PHASE MIB". Prints
# "RESULT op seconds amount" lines.
vmm_fs_script() {
  cat <<'SH'
#!/bin/sh
# Written by hack/bench.d/vmm.sh. Runs in the container (ROOT empty) or in
# the test host (ROOT = the rootfs) with busybox sh.
set -e
root=${1:-}
read -r phase mib files <"$root/vmm-fs.args"
d=$root/vmm-data
mkdir -p "$d"
case $phase in
  write)
    rm -f "$d/big"
    read -r t0 _ </proc/uptime
    dd if=/dev/zero of="$d/big" bs=1048576 count="$mib" conv=fsync 2>/dev/null
    read -r t1 _ </proc/uptime
    echo "RESULT write $t0 $t1 $(stat -c %s "$d/big")"
    ;;
  read)
    read -r t0 _ </proc/uptime
    dd if="$d/big" of=/dev/null bs=1048576 2>/dev/null
    read -r t1 _ </proc/uptime
    echo "RESULT read $t0 $t1 $(stat -c %s "$d/big")"
    ;;
  meta)
    rm -rf "$d/m"
    mkdir "$d/m"
    cd "$d/m"
    read -r t0 _ </proc/uptime
    i=0
    while [ $i -lt "$files" ]; do echo x >"f$i"; i=$((i + 1)); done
    read -r t1 _ </proc/uptime
    echo "RESULT create $t0 $t1 $files"
    i=0
    while [ $i -lt "$files" ]; do [ -f "f$i" ] || exit 1; i=$((i + 1)); done
    read -r t2 _ </proc/uptime
    echo "RESULT stat $t1 $t2 $files"
    cd /
    rm -rf "$d/m"
    read -r t3 _ </proc/uptime
    echo "RESULT delete $t2 $t3 $files"
    ;;
esac
SH
}

# ---------------------------------------------------------------------------
# Inside the test host: `bash vmm.sh inner KRUN_OCI OUT BUNDLES WORK ROUNDS
# FS_ROUNDS FS_MIB FS_FILES [BASE LIBDIR]`: BASE, a krun-oci prefix, adds
# the backends BACKEND@base; LIBDIR is then KRUN_OCI's libdir.

vmm_inner() {
  set -euo pipefail
  export LC_ALL=C
  krun=$1 out=$2 bundles=$3 vwork=$4 rounds=$5 fs_rounds=$6 fs_mib=$7 fs_files=$8 base=${9:-} libdir=${10:-}
  vmm_backends=(builtin builtin-cold qemu)
  [ -z "$base" ] || vmm_backends=(builtin builtin-cold qemu builtin@base qemu@base)
  tr=/sys/kernel/tracing
  # Templates in the test host's own tmpfs (its /var is this machine's).
  export KRUN_OCI_TEMPLATE_DIR=/run/krun-oci-templates
  # The builds too: the test host reaches this machine's files over
  # virtio-fs, whose virtiofsd (--cache=auto) has the test host drop a
  # file's pages at each open, so every exec of krun-oci (the runtime's,
  # then the built-in VMM's) would read the binary through FUSE again:
  # 0.8 s more per start under TCG, which no host with its own disk pays.
  vmm_local_build "$krun" "${libdir:-$(dirname "$krun")/../lib/krun-oci}" /run/krun-oci-bench/build
  krun=/run/krun-oci-bench/build/bin/krun-oci libdir=/run/krun-oci-bench/build/lib/krun-oci
  if [ -n "$base" ]; then
    vmm_local_build "$base/bin/krun-oci" "$base/lib/krun-oci" /run/krun-oci-bench/base
    base=/run/krun-oci-bench/base
  fi
  mkdir -p "$vwork"
  trap vmm_inner_cleanup EXIT
  vmm_trace_setup
  local k=${#vmm_backends[@]}

  printf 'round\tbackend\tid\tstatus\twall_ms\tpre_ms\tvmm_exec_ms\tpost_ms\toverhead_ms\tguest_ms\thost_setup_ms\tkernel_zero_ms\tteardown_ms\terror\n' >"$out/vmm-overhead.tsv"
  printf 'round\tbackend\tpid\tprocess\tvmhwm_kb\tpss_kb\tguest_pss_kb\tguest_rss_kb\n' >"$out/vmm-memory.tsv"
  printf 'round\ttarget\top\tstatus\tseconds\tamount\terror\n' >"$out/vmm-fs.tsv"

  vmm_rounds overhead 0 "$rounds" vmm_overhead_once 0
  vmm_rounds memory 1 "$rounds" vmm_memory_once 0
  vmm_rounds "file system" 1 "$fs_rounds" vmm_fs_once 1
}

# `vmm_rounds WHAT FIRST LAST ONCE NATIVE`: rounds FIRST to LAST of ONCE
# ROUND BACKEND, each over every backend in a rotated order (and, with
# NATIVE 1, the host's own file system last), so that no backend always
# runs first.
vmm_rounds() {
  local what=$1 first=$2 last=$3 once=$4 native=$5 r i b
  for ((r = first; r <= last; r++)); do
    for ((i = 0; i < k + native; i++)); do
      b=$( ((i < k)) && echo "${vmm_backends[(r + i) % k]}" || echo native)
      "$once" "$r" "$b"
    done
    echo "  vmm: $what round $r/$last done" >&2
  done
}

# vmm_local_build EXE LIBDIR DEST: a copy of a krun-oci build laid out as
# target/dist (DEST/bin/krun-oci, DEST/lib/krun-oci/...).
vmm_local_build() {
  rm -rf "$3"
  mkdir -p "$3/bin" "$3/lib/krun-oci"
  cp "$1" "$3/bin/krun-oci"
  cp -R "$2/." "$3/lib/krun-oci/"
}

vmm_inner_cleanup() {
  local p
  # Anything still running from our work folder (a VM of ours) goes.
  # shellcheck disable=SC2013 # pids, one a word
  for p in $(grep -lsF "$vwork/" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    [ "$p" = $$ ] || kill -KILL "$p" 2>/dev/null || true
  done
  for p in vmmfirst vmmlast; do
    [ ! -d "$tr/instances/$p" ] || rmdir "$tr/instances/$p" 2>/dev/null || true
  done
  rm -rf "$vwork" /run/krun-oci-bench
}

# Two trace instances on the mono clock: `first` keeps only the first events
# (no overwrite, a small buffer) and records vCPU 0's KVM entries; `last`
# records execs, krun-oci's thread exits and KVM_EXIT_SHUTDOWN exits.
vmm_trace_setup() {
  [ -e "$tr/trace" ] || mount -t tracefs nodev "$tr"
  local i
  for i in vmmfirst vmmlast; do
    [ ! -d "$tr/instances/$i" ] || rmdir "$tr/instances/$i"
    mkdir "$tr/instances/$i"
    echo mono >"$tr/instances/$i/trace_clock"
    echo 0 >"$tr/instances/$i/tracing_on"
  done
  i=$tr/instances/vmmfirst
  echo 0 >"$i/options/overwrite"
  echo 8 >"$i/buffer_size_kb"
  echo 'vcpu_id == 0' >"$i/events/kvm/kvm_entry/filter"
  echo 1 >"$i/events/kvm/kvm_entry/enable"
  i=$tr/instances/vmmlast
  echo 512 >"$i/buffer_size_kb"
  echo 1 >"$i/events/sched/sched_process_exec/enable"
  echo 'comm == "krun-oci"' >"$i/events/sched/sched_process_exit/filter"
  echo 1 >"$i/events/sched/sched_process_exit/enable"
  echo 'reason == 8 && errno == 0' >"$i/events/kvm/kvm_userspace_exit/filter"
  echo 1 >"$i/events/kvm/kvm_userspace_exit/enable"
}

vmm_trace() { # on|off
  local i v=0
  [ "$1" = off ] || v=1
  for i in vmmfirst vmmlast; do
    [ "$v" = 0 ] || : >"$tr/instances/$i/trace"
    echo "$v" >"$tr/instances/$i/tracing_on"
  done
}

# vmm_krun BACKEND: sets `kargv` to the krun-oci build of BACKEND with its
# --root (BACKEND@base: the build in BASE, with its own state root) and
# `kroot` to that root. With BASE both builds run through env, each with
# its KRUN_OCI_LIBDIR, so that both pay the same exec.
vmm_krun() {
  if [[ $1 == *@base ]]; then
    kroot=$vwork/state-base
    kargv=(env "KRUN_OCI_LIBDIR=$base/lib/krun-oci" "$base/bin/krun-oci" --root "$kroot")
  elif [ -n "$base" ]; then
    kroot=$vwork/state
    kargv=(env "KRUN_OCI_LIBDIR=$libdir" "$krun" --root "$kroot")
  else
    kroot=$vwork/state
    kargv=("$krun" --root "$kroot")
  fi
}

# vmm_id PREFIX ROUND BACKEND [SUFFIX]: a container id ('@' is not allowed).
vmm_id() { echo "$1-$2-${3//@/-}${4:+-$4}"; }

# vmm_argv BACKEND ID BUNDLE: sets `argv` to krun-oci running BUNDLE.
vmm_argv() {
  local kargv kroot
  vmm_krun "$1"
  local hv=${1%@base} cold=()
  # builtin-cold: the built-in VMM booting every VM (no template).
  if [ "$hv" = builtin-cold ]; then hv=builtin cold=(--no-template); fi
  argv=("${kargv[@]}" --hypervisor "$hv" "${cold[@]}" --debug --log-format json
    --log "$out/vmm-logs/$2.json" run --bundle "$3" "$2")
}

# vmm_overhead_once ROUND BACKEND: one traced run of `true`.
vmm_overhead_once() {
  local round=$1 b=$2 id argv t0 t1 rc=0 err="" moments timings
  id=$(vmm_id vmm "$1" "$2")
  vmm_argv "$b" "$id" "$bundles/vmm-true"
  vmm_trace on
  t0=${EPOCHREALTIME/./}
  "${argv[@]}" </dev/null >"$vwork/$id.out" 2>"$vwork/$id.err" || rc=$?
  t1=${EPOCHREALTIME/./}
  vmm_trace off
  [ "$rc" -eq 0 ] || err="exit $rc: $(tail -n 1 "$vwork/$id.err" | tr '\t' ' ' | cut -c1-160)"
  # Moments (s, trace clock): krun-oci exec, qemu exec, first entry,
  # shutdown exit, krun-oci main-thread exit; then differences in ms.
  moments=$(
    {
      sed 's/^/F /' "$tr/instances/vmmfirst/trace"
      sed 's/^/L /' "$tr/instances/vmmlast/trace"
    } | awk '
      /^. #/ { next }
      { ts = ""; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { ts = substr($i, 1, length($i) - 1); ev = $(i + 1); break }
        if (ts == "") next }
      $1 == "F" && ev == "kvm_entry:" && entry == "" { entry = ts }
      $1 == "L" && ev == "sched_process_exec:" {
        for (j = 1; j <= NF; j++) { if ($j ~ /^filename=/) fn = substr($j, 10); if ($j ~ /^pid=/) pid = substr($j, 5) }
        if (fn ~ /\/krun-oci$/ && exec == "") { exec = ts; kpid = pid }
        if ((fn ~ /qemu-system/ || fn == "/proc/self/exe") && qexec == "") qexec = ts
      }
      $1 == "L" && ev == "kvm_userspace_exit:" && shut == "" { shut = ts }
      $1 == "L" && ev == "sched_process_exit:" {
        for (j = 1; j <= NF; j++) if ($j ~ /^pid=/) pid = substr($j, 5)
        if (pid == kpid) ex = ts
      }
      function d(a, b) { return a == "" || b == "" ? "NA" : sprintf("%.3f", (b - a) * 1000) }
      END {
        pre = d(exec, entry); post = d(shut, ex)
        printf "%s\t%s\t%s\t%s\t%s\n", pre, d(exec, qexec), post,
          pre == "NA" || post == "NA" ? "NA" : sprintf("%.3f", pre + post), d(entry, shut)
      }')
  # (the log's fields are strings)
  timings=$(jq -Rrs '
    def num: if . == null then null else (tonumber? // null) end;
    def ms: if . == null then "NA" else (. * 1000 | round / 1000) end;
    split("\n") | map(fromjson? // empty) as $l
    | ($l | map(select(.msg == "timings")) | .[0] // {}) as $t
    | ($t.host_setup_ms | num) as $h | ($t.vmm_start_ms | num) as $v
    | ($l | map(select(.msg == "VM stopped")) | .[0].teardown_ms | num) as $down
    | [($h | ms), (if $h and $v then $h + $v else null end | ms), ($down | ms)] | @tsv' "$out/vmm-logs/$id.json" 2>/dev/null) || timings=$'NA\tNA\tNA'
  local pre post
  IFS=$'\t' read -r pre _ post _ <<<"$moments"
  if [ -z "$err" ] && { [ "$pre" = NA ] || [ "$post" = NA ]; }; then
    err="trace events missing: $(tr '\t' ' ' <<<"$moments")"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$b" "$id" "$([ -z "$err" ] && echo ok || echo failed)" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1000 }')" "$moments" "$timings" "$err" >>"$out/vmm-overhead.tsv"
  [ -z "$err" ] || echo "  vmm: $b round $round: $err" >&2
}

# vmm_guest_kb BACKEND: the guest RAM size in KiB (the default VM: 512 MiB).
# vmm_smaps PID GUEST_KB: "pss_kb guest_pss_kb guest_rss_kb" of PID, guest
# RAM being an anonymous mapping of the guest's size (the kernel merges it
# with an adjacent anonymous mapping: up to 1 MiB more is allowed), a
# memfd mapping of at least that size (QEMU's memory-backend-memfd), or the
# private mapping of a VM template (KEY.snap) from its lowest address on
# for the guest's size (the built-in VMM started from a template: the
# clean pages are the template file's, in the page cache, shared by every
# clone, so Pss divides them; its large holes are anonymous mappings in
# that range).
vmm_smaps() {
  local f=/proc/$1/smaps
  awk -v gk="$2" '
    function hex(h,   i, n) { n = 0; for (i = 1; i <= length(h); i++) n = n * 16 + index("0123456789abcdef", substr(h, i, 1)) - 1; return n }
    /^[0-9a-f]+-[0-9a-f]+ / { path = $6; for (i = 7; i <= NF; i++) path = path " " $i; split($1, a, "-"); start = hex(a[1]) }
    FNR == NR { if (/^[0-9a-f]+-[0-9a-f]+ / && path ~ /\.snap( \(deleted\))?$/ && (base == "" || start < base)) base = start; next }
    /^[0-9a-f]+-[0-9a-f]+ / { guest = 0; next }
    $1 == "Size:" { guest = (path == "" && $2 >= gk && $2 <= gk + 1024) || (path ~ /^\/memfd:/ && $2 >= gk) ||
      (base != "" && start >= base && start < base + gk * 1024) }
    $1 == "Pss:" { pss += $2; if (guest) gp += $2 }
    $1 == "Rss:" { if (guest) gr += $2 }
    END { printf "%d %d %d\n", pss, gp, gr }' "$f" "$f"
}

# vmm_tree PID: PID and its descendants.
vmm_tree() {
  local p=$1 c
  echo "$p"
  # shellcheck disable=SC2013 # pids, one a word
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do vmm_tree "$c"; done
}

# vmm_memory_once ROUND BACKEND: samples every host process of an idle
# container 3 s after it is running.
vmm_memory_once() {
  local round=$1 b=$2 id argv pid st="" i p comm hwm sm rows="" err="" gkb=$((512 * 1024)) kargv kroot
  id=$(vmm_id vmm-mem "$1" "$2")
  vmm_krun "$b"
  vmm_argv "$b" "$id" "$bundles/vmm-sleep"
  "${argv[@]}" </dev/null >"$vwork/$id.out" 2>"$vwork/$id.err" &
  pid=$!
  for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    st=$(jq -r '.status // empty' "$kroot/$id/state.json" 2>/dev/null || true)
    [ "$st" != running ] || break
    sleep 0.1
  done
  if [ "$st" = running ]; then
    sleep 3
    for p in $(vmm_tree "$pid"); do
      { read -r comm <"/proc/$p/comm" &&
        hwm=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$p/status") &&
        sm=$(vmm_smaps "$p" "$gkb"); } 2>/dev/null || continue
      rows+=$(printf '%s\t%s\t%s\t%s\t%s\t%s' "$round" "$b" "$p" "$comm" "${hwm:-0}" "${sm// /$'\t'}")$'\n'
    done
  else
    err="never reported running (last status '${st:-none}')"
  fi
  # The workload is `sleep 3600`: end it.
  "${kargv[@]}" kill "$id" KILL >/dev/null 2>&1 || kill -KILL "$pid" 2>/dev/null || true
  local rc=0
  wait "$pid" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 137 ] || err="${err:-exit $rc: $(tail -n 1 "$vwork/$id.err" | cut -c1-160)}"
  if [ -n "$err" ]; then
    printf '%s\t%s\t-\tfailed: %s\t0\t0\t0\t0\n' "$round" "$b" "$err" >>"$out/vmm-memory.tsv"
    echo "  vmm: memory $b round $round: $err" >&2
  else
    printf '%s' "$rows" >>"$out/vmm-memory.tsv"
  fi
}

# vmm_fs_once ROUND TARGET: write, read, small files, in a container of
# TARGET's backend or natively (TARGET native).
vmm_fs_once() {
  local round=$1 t=$2 root=$bundles/vmm-fs/rootfs phase
  for phase in write read meta; do
    echo "$phase $fs_mib $fs_files" >"$root/vmm-fs.args"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    vmm_fs_phase "$round" "$t" "$phase" "$root"
  done
}

# vmm_fs_phase ROUND TARGET PHASE ROOT [NOFILE]: one phase; NOFILE raises
# krun-oci's RLIMIT_NOFILE first (the retry after "Too many open files").
vmm_fs_phase() {
  local round=$1 t=$2 phase=$3 root=$4 nofile=${5:-} id argv rc=0 err="" note=""
  id=$(vmm_id vmm-fs "$1" "$2" "$3${5:+-nofile}")
  if [ "$t" = native ]; then
    "$root/bin/busybox" sh "$root/vmm-fs.sh" "$root" </dev/null >"$vwork/$id.out" 2>"$vwork/$id.err" || rc=$?
  else
    vmm_argv "$t" "$id" "$bundles/vmm-fs"
    (
      [ -z "$nofile" ] || ulimit -n "$nofile"
      exec "${argv[@]}" </dev/null >"$vwork/$id.out" 2>"$vwork/$id.err"
    ) || rc=$?
  fi
  [ "$rc" -eq 0 ] || err="exit $rc: $(tail -n 1 "$vwork/$id.err" | tr '\t' ' ' | cut -c1-160)"
  if [ -n "$err" ] || ! grep -q '^RESULT ' "$vwork/$id.out"; then
    printf '%s\t%s\t%s\tfailed\tNA\tNA\t%s\n' "$round" "$t" "$phase" "${err:-no RESULT line}" >>"$out/vmm-fs.tsv"
    echo "  vmm: fs $t $phase round $round: ${err:-no RESULT line}" >&2
    # Out of file descriptors: measure again with a higher limit, and say so.
    if [ -z "$nofile" ] && [[ $err == *"Too many open files"* ]]; then
      echo "  vmm: fs $t $phase round $round: again with ulimit -n 65536" >&2
      vmm_fs_phase "$round" "$t" "$phase" "$root" 65536
    fi
    return 0
  fi
  [ -z "$nofile" ] || note="note: ran with krun-oci's RLIMIT_NOFILE raised to $nofile (the default failed)"
  grep '^RESULT ' "$vwork/$id.out" | while read -r _ op a z amount; do
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\n' "$round" "$t" "$op" "$(awk -v a="$a" -v z="$z" 'BEGIN { printf "%.2f", z - a }')" "$amount" "$note"
  done >>"$out/vmm-fs.tsv"
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = inner ]; then
  shift
  vmm_inner "$@"
fi
