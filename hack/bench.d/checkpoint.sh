# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, out, work, rounds...
# checkpoint     `checkpoint` and `restore` of a running container that
#                holds memory: krun-oci (the built-in VMM captures the
#                whole VM) against runc + CRIU (the container's processes),
#                side by side in one `hack/nested` test host (the built-in
#                VMM boots a guest only there; runc runs there too, so both
#                are measured on the same machine: TCG, slow, compare side
#                by side). The workload is memhold
#                (guest-init/examples/memhold.rs, static, in a busybox
#                bundle): it fills N MiB of its own memory with
#                pseudo-random words (no zero page, nothing compressible),
#                then counts into /count every 50 ms. For N in
#                KRUN_OCI_BENCH_CKPT_SIZES (default "64 512"), krun-oci's
#                VM gets max(256, 2N) MiB (annotation io.krun-oci.memory_mib:
#                256 and 1024: the guest kernel, guest-init and the page
#                cache beside the held memory; no memory limit, so no
#                cgroup in the guest); runc's container has no limit
#                either. Rounds: min(-n, KRUN_OCI_BENCH_CKPT_ROUNDS,
#                default 3), sizes in turn, runtimes interleaved (the
#                order alternates), no warm-up (nothing timed depends on
#                it; the first VM of a size builds its template first).
#                Each round, size and runtime, one container:
#                - create + start, then the count's first number (the fill;
#                  reported, not compared);
#                - checkpoint --leave-running twice (first, later), each into
#                  a new image directory, removed once measured; the count
#                  must go on;
#                - checkpoint (the container stops; the count must stand);
#                - delete, then restore --detach from that image: wall time
#                  of the command, and from its start until the count is
#                  seen past where it stood (polled every 20 ms; a count
#                  below it is a failure: the workload started anew);
#                - SIGUSR1: memhold checks every word of its memory
#                  against its generator (a failure if any differs);
#                - delete --force, images removed; a container or process
#                  left behind is a failure.
#                Image sizes: du -k (on disk) and du -k --apparent-size of
#                each image directory. Images are written to the bench's
#                work folder, on this machine's disk (the test host reaches
#                it over virtio-fs: the page cache takes them, as on a real
#                host's disk; in a tmpfs they would be charged, unreclaimable,
#                to the cgroup of the writer, which for krun-oci is the
#                container's own host cgroup); bundles, state and krun-oci's
#                templates live in a tmpfs of the test host. CRIU needs kernel
#                modules the test host does not load at boot (see
#                hack/nested.d/prepare.sh, extra_modules): loaded first.
#                KRUN_OCI_BASE is not measured here. Writes
#                checkpoint.tsv and checkpoint-logs/ (each runtime's log;
#                on a failure the image's dump.log/restore.log and the
#                test host's dmesg) to DIR.

all_scenarios+=(checkpoint)

ckpt_runtimes=(krun-oci runc)
# checkpoint.tsv's columns between the row's key (round, size_mib,
# runtime, id, status) and its error: ms, KiB, counts; NA where not
# measured (capture_*: the VMM's own capture time, krun-oci's record).
ckpt_columns=(vm_mib fill_ms ck_first_ms ck_later_ms ck_stop_ms first_disk_kib first_apparent_kib
  later_disk_kib later_apparent_kib stop_disk_kib stop_apparent_kib capture_first_ms capture_later_ms
  capture_stop_ms count_at_stop restore_ms advance_ms count_after)

# ---------------------------------------------------------------------------
# Outside: bundles, then the inner part in one test host, then the report.

scenario_checkpoint() {
  local r n tool=$top/target/dist/tools/memhold sizes extra budget t0 rc=0 per_round=0
  r=$((rounds < ${KRUN_OCI_BENCH_CKPT_ROUNDS:-3} ? rounds : ${KRUN_OCI_BENCH_CKPT_ROUNDS:-3}))
  [[ $r =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_CKPT_ROUNDS wants a positive number"
  read -r -a sizes <<<"${KRUN_OCI_BENCH_CKPT_SIZES:-64 512}"
  [ "${#sizes[@]}" -gt 0 ] || die "KRUN_OCI_BENCH_CKPT_SIZES names no size"
  for n in "${sizes[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_CKPT_SIZES wants sizes in MiB, not '$n'"
  done
  if [ ! -x "$tool" ] || [ "$top/guest-init/examples/memhold.rs" -nt "$tool" ]; then
    die "checkpoint: $tool is missing or older than its source: run hack/build"
  fi
  ! ldd "$tool" 2>/dev/null | grep -q '=>' || die "$tool is not static"
  apt_ensure criu
  ckpt_rounds=$r ckpt_sizes=("${sizes[@]}")
  for n in "${sizes[@]}"; do
    "$here/mkbundle" "$bundles/ckpt-$n" /bin/memhold "$n"
    install -m 0755 "$tool" "$bundles/ckpt-$n/rootfs/bin/memhold"
    jq --arg vm "$(ckpt_vm_mib "$n")" '.annotations["io.krun-oci.memory_mib"] = $vm' \
      "$bundles/ckpt-$n/config.json" >"$bundles/ckpt-$n/config.json.new"
    mv "$bundles/ckpt-$n/config.json.new" "$bundles/ckpt-$n/config.json"
    # Under nested TCG: about 0.25 s a MiB to fill, 0.1 s a MiB for each
    # of three checkpoints and the restore and the check, for both
    # runtimes; 150 s of fixed costs each.
    per_round=$((per_round + 2 * (150 + n * 3 / 4)))
  done
  # The test host prepared as `run` will boot it: the folder of the
  # modules it loads on demand.
  extra=$("$here/nested" prepare)/extra
  [ -s "$extra/load.list" ] || die "checkpoint: $extra/load.list is missing (hack/nested.d/prepare.sh)"
  rm -rf "$out/checkpoint-logs" "$out/checkpoint.tsv"
  mkdir -p "$out/checkpoint-logs"
  budget=${KRUN_OCI_BENCH_CKPT_TIMEOUT:-$((300 + r * per_round))}
  log "checkpoint: ${ckpt_runtimes[*]}, ${sizes[*]} MiB held, $r round(s) in a nested test host (limit $budget s)"
  t0=$EPOCHSECONDS
  "$here/nested" run --timeout "$budget" -- \
    bash "$here/bench.d/checkpoint.sh" inner "$KRUN_OCI" "$out" "$bundles" "$work/checkpoint" "$r" "$extra" "${sizes[*]}" ||
    rc=$?
  ckpt_wall=$((EPOCHSECONDS - t0))
  [ "$rc" -eq 0 ] || log "checkpoint: the test host run failed (exit $rc); reporting what was measured"
}

# ckpt_vm_mib N: krun-oci's VM size for a workload holding N MiB.
ckpt_vm_mib() { echo $(($1 * 2 > 256 ? $1 * 2 : 256)); }

# ckpt_col SIZE RUNTIME COLUMN [SCALE]: COLUMN of the successful rows of
# SIZE and RUNTIME, divided by SCALE (default 1).
ckpt_col() {
  awk -F'\t' -v n="$1" -v rt="$2" -v c="$3" -v s="${4:-1}" '
    NR == 1 { for (i = 1; i <= NF; i++) h[$i] = i; next }
    $h["size_mib"] == n && $h["runtime"] == rt && $h["status"] == "ok" && $h[c] ~ /^[0-9.]+$/ { print $h[c] / s }' \
    "$out/checkpoint.tsv"
}

# ckpt_cell DECIMALS: "median (min-max)" of the numbers on stdin, or "-".
ckpt_cell() {
  sort -g | awk -v d="$1" '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print "-"; exit }
      m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      f = "%." d "f"
      if (NR == 1) printf f "\n", m
      else printf f " (" f "-" f ")\n", m, v[1], v[NR]
    }'
}

# ckpt_median: the median of the numbers on stdin, or nothing.
ckpt_median() {
  sort -g | awk '{ v[NR] = $1 } END { if (NR) print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

report_checkpoint() {
  local f=$out/checkpoint.tsv n row name col scale dec cells a b ok all
  echo "Checkpoint and restore of a running container holding memory: krun-oci (built-in VMM,"
  echo "the whole VM) against runc + $(criu --version 2>/dev/null | sed -n 's/^Version: /CRIU /p') (the container's processes), in one nested test"
  echo "host (QEMU/TCG, 1 CPU; krun-oci's VM runs under nested KVM there: every number is far"
  echo "slower than on a real host, compare side by side). Workload: memhold, N MiB of its own"
  echo "memory filled with pseudo-random words, then counting every 50 ms. ${ckpt_rounds:-?} round(s),"
  echo "runtimes interleaved; median (min-max). Wall time of the scenario ${ckpt_wall:-?} s."
  if [ ! -s "$f" ]; then
    echo "  no results (see the messages above)"
    return 0
  fi
  for n in "${ckpt_sizes[@]}"; do
    echo
    printf '  %-44s %-26s %-26s %s\n' "$n MiB held (krun-oci VM $(ckpt_vm_mib "$n") MiB)" "${ckpt_runtimes[@]}" "krun-oci/runc"
    for row in \
      "checkpoint --leave-running, first (s)|ck_first_ms|1000|2" \
      "checkpoint --leave-running, later (s)|ck_later_ms|1000|2" \
      "checkpoint, stopping it (s)|ck_stop_ms|1000|2" \
      "image on disk, du (MiB)|stop_disk_kib|1024|1" \
      "image apparent size (MiB)|stop_apparent_kib|1024|1" \
      "restore, command start to return (s)|restore_ms|1000|2" \
      "restore, start to the count going on (s)|advance_ms|1000|2" \
      "(filling the memory first (s))|fill_ms|1000|1"; do
      IFS='|' read -r name col scale dec <<<"$row"
      cells=()
      for rt in "${ckpt_runtimes[@]}"; do cells+=("$(ckpt_col "$n" "$rt" "$col" "$scale" | ckpt_cell "$dec")"); done
      a=$(ckpt_col "$n" krun-oci "$col" | ckpt_median)
      b=$(ckpt_col "$n" runc "$col" | ckpt_median)
      printf '  %-44s %-26s %-26s %s\n' "$name" "${cells[@]}" \
        "$(awk -v a="$a" -v b="$b" 'BEGIN { if (a != "" && b + 0 > 0) printf "%.2fx", a / b; else print "-" }')"
    done
    cells=()
    for rt in "${ckpt_runtimes[@]}"; do
      ok=$(awk -F'\t' -v n="$n" -v rt="$rt" '$2 == n && $3 == rt && $5 == "ok"' "$f" | wc -l)
      all=$(awk -F'\t' -v n="$n" -v rt="$rt" '$2 == n && $3 == rt' "$f" | wc -l)
      cells+=("$ok of $all")
    done
    printf '  %-44s %-26s %-26s\n' "rounds ok (memory verified after restore)" "${cells[@]}"
  done
  echo
  awk -F'\t' 'NR > 1 && $5 != "ok" { printf "  FAILED: %s, %s MiB, round %s: %s\n", $3, $2, $1, $NF }' "$f"
  echo "  Images: the one the restore read (the stopping checkpoint's); each checkpoint's in"
  echo "  checkpoint.tsv. krun-oci's image is its VM's memory with zero pages as holes, its"
  echo "  devices and vCPUs; runc's is CRIU's image of the processes. Images are on this"
  echo "  machine's disk, reached from the test host over virtio-fs; krun-oci's VM templates"
  echo "  are in the test host's tmpfs. count going on: from the restore command's start until"
  echo "  /count in the rootfs holds a number past the one it held at the stopping checkpoint."
}

# ---------------------------------------------------------------------------
# Inside the test host: `bash checkpoint.sh inner KRUN_OCI OUT BUNDLES WORK
# ROUNDS EXTRA "SIZE..."`, EXTRA the folder of the modules CRIU needs.

ckpt_inner() {
  set -euo pipefail
  export LC_ALL=C
  krun=$1 out=$2 bundles=$3 cwork=$4 rounds=$5 extra=$6
  local -a sizes
  read -r -a sizes <<<"$7"
  local r i n k=${#ckpt_runtimes[@]} ko
  # Bundles, state roots and templates in a tmpfs of the test host.
  fast=/run/krun-bench-ckpt
  logs=$out/checkpoint-logs
  mkdir -p "$cwork" "$fast"
  mount -t tmpfs -o mode=0700 krun-bench-ckpt "$fast"
  trap ckpt_inner_cleanup EXIT
  export KRUN_OCI_TEMPLATE_DIR=$fast/templates
  # A sleep without a fork (an exec costs tens of ms under TCG).
  exec {snooze_fd}<> <(:)
  while read -r ko; do
    [ -d "/sys/module/${ko%.ko}" ] || insmod "$extra/$ko"
  done <"$extra/load.list"
  printf '%s\t' round size_mib runtime id status "${ckpt_columns[@]}" >"$out/checkpoint.tsv"
  printf 'error\n' >>"$out/checkpoint.tsv"
  for ((r = 1; r <= rounds; r++)); do
    for n in "${sizes[@]}"; do
      for ((i = 0; i < k; i++)); do
        ckpt_once "$r" "$n" "${ckpt_runtimes[(r + i) % k]}"
      done
    done
    echo "  checkpoint: round $r/$rounds done" >&2
  done
}

ckpt_inner_cleanup() {
  local p root d
  for root in "$fast"/state-*; do
    for d in "$root"/*; do
      [ -d "$d" ] || continue
      case $root in
        */state-runc) timeout 30 runc --root "$root" delete --force "${d##*/}" >/dev/null 2>&1 || true ;;
        *) timeout 30 "$krun" --root "$root" delete --force "${d##*/}" >/dev/null 2>&1 || true ;;
      esac
    done
  done
  # Anything still running from our folders (a VM, a container) goes.
  # shellcheck disable=SC2013 # pids, one a word
  for p in $(grep -lsF -e "$fast/" -e "$cwork/" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    [ "$p" = $$ ] || kill -KILL "$p" 2>/dev/null || true
  done
  umount -l "$fast" 2>/dev/null || true
  rm -rf "$cwork"
}

snooze() { read -r -t "$1" -u "$snooze_fd" _ || true; }

# now_ms: the time, in ms since the epoch (with µs).
now_ms() { local t=${EPOCHREALTIME/./}; printf '%d.%03d' $((t / 1000)) $((t % 1000)); }

# ckpt_argv: sets `argv` to the runtime $rt on its state root, with its
# own log in the logs folder (krun-oci's with debug lines) for container
# $id.
ckpt_argv() {
  if [ "$rt" = runc ]; then
    argv=(runc --root "$fast/state-runc" --log "$logs/$id.runc.log")
  else
    argv=("$krun" --root "$fast/state-krun-oci" --debug --log-format json --log "$logs/$id.json")
  fi
}

# ckpt_timed VAR SECONDS WHAT ARG...: runs the runtime with ARG... (stdin
# /dev/null, stdout and stderr to $logs/$id.WHAT.{out,err}; runc's
# stdio, which a created or restored container inherits, to /dev/null,
# as CRIU can carry only what the container can reach), at most
# SECONDS; VAR = its wall time in ms. On a failure sets `err` and
# returns 1.
ckpt_timed() {
  local var=$1 secs=$2 what=$3 t0 t1 rc=0 o=$logs/$id.$3.out e=$logs/$id.$3.err argv
  shift 3
  [ "$rt" != runc ] || o=/dev/null e=/dev/null
  ckpt_argv
  t0=${EPOCHREALTIME/./}
  timeout "$secs" "${argv[@]}" "$@" </dev/null >"$o" 2>"$e" || rc=$?
  t1=${EPOCHREALTIME/./}
  printf -v "$var" '%d.%03d' $(((t1 - t0) / 1000)) $(((t1 - t0) % 1000))
  [ "$rc" -ne 0 ] || return 0
  err="$what: exit $rc$([ "$rc" -ne 124 ] || echo " (timed out after $secs s)"): $(ckpt_last_error)"
  return 1
}

# ckpt_last_error: the last line of what the runtime said, for a message.
ckpt_last_error() {
  local f
  for f in "$logs/$id".*.err "$logs/$id.runc.log"; do [ -s "$f" ] && tail -n 1 "$f"; done 2>/dev/null |
    tail -n 1 | tr '\t' ' ' | cut -c1-200
}

# ckpt_count: the number in the rootfs's /count (0 when there is none).
ckpt_count() {
  local v=""
  { read -r v <"$b/rootfs/count"; } 2>/dev/null || true
  [[ $v =~ ^[0-9]+$ ]] || v=0
  echo "$v"
}

# ckpt_wait_count PAST SECONDS: waits until the count is past PAST, at most
# SECONDS (polled every 20 ms); sets `seen`. Returns 1 on the timeout.
ckpt_wait_count() {
  local past=$1 end=$((${EPOCHREALTIME/./} + $2 * 1000000))
  while :; do
    seen=$(ckpt_count)
    [ "$seen" -le "$past" ] || return 0
    [ "${EPOCHREALTIME/./}" -lt "$end" ] || return 1
    snooze 0.02
  done
}

# ckpt_image WHICH DIR: records DIR's sizes (KiB on disk and apparent) and,
# for krun-oci, the VMM's own capture time into the row, then removes DIR
# unless WHICH is stop (the one restored).
ckpt_image() {
  local which=$1 dir=$2
  row[${which}_disk_kib]=$(du -sk "$dir" | cut -f1)
  row[${which}_apparent_kib]=$(du -sk --apparent-size "$dir" | cut -f1)
  if [ "$rt" = krun-oci ]; then
    row[capture_${which}_ms]=$(jq -r '.capture_ms // "NA"' "$dir/krun-checkpoint.json" 2>/dev/null || echo NA)
  fi
  [ "$which" = stop ] || rm -rf "$dir"
}

# ckpt_state: the container's status as its runtime says ("" if unknown).
ckpt_state() {
  local argv
  ckpt_argv
  timeout 60 "${argv[@]}" state "$id" 2>/dev/null | jq -r '.status // empty' 2>/dev/null || true
}

# ckpt_once ROUND SIZE RT: one container through the whole sequence; one
# row of checkpoint.tsv, failed or not; everything it made removed.
ckpt_once() {
  local round=$1 n=$2 rt=$3 id b img t at c err="" seen k
  local -A row=()
  id=ck-$round-$n-$rt
  b=$fast/bundle-$rt-$n
  img=$cwork/img-$id
  rm -rf "$b" "$img"-*
  cp -a "$bundles/ckpt-$n" "$b"
  mkdir -p "$fast/state-$rt"
  for k in "${ckpt_columns[@]}"; do row[$k]=NA; done
  [ "$rt" = runc ] || row[vm_mib]=$(ckpt_vm_mib "$n")
  echo "  checkpoint: round $round, $n MiB, $rt" >&2
  ckpt_sequence || true
  ckpt_end
  {
    printf '%s\t%s\t%s\t%s\t%s' "$round" "$n" "$rt" "$id" "$([ -z "$err" ] && echo ok || echo failed)"
    for k in "${ckpt_columns[@]}"; do printf '\t%s' "${row[$k]}"; done
    printf '\t%s\n' "$err"
  } >>"$out/checkpoint.tsv"
  [ -z "$err" ] || echo "  checkpoint: FAILED: $rt, $n MiB, round $round: $err" >&2
}

# The sequence (see the header); stops at the first failure, which `err`
# says.
ckpt_sequence() {
  local t1 t0 fill_s=$((60 + n / 2)) ck_s=$((120 + n)) st
  ckpt_timed t 300 create create --bundle "$b" --pid-file "$fast/$id.pid" "$id" || return 1
  ckpt_timed t 120 start start "$id" || return 1
  t0=${EPOCHREALTIME/./}
  ckpt_wait_count 0 "$fill_s" || { err="the count never started (memhold filling $n MiB for $fill_s s)"; return 1; }
  t1=${EPOCHREALTIME/./}
  row[fill_ms]=$(((t1 - t0) / 1000))

  local which
  for which in first later; do
    ckpt_timed "row[ck_${which}_ms]" "$ck_s" "checkpoint-$which" checkpoint --leave-running \
      --image-path "$img-$which" "$id" || return 1
    at=$(ckpt_count)
    ckpt_image "$which" "$img-$which"
    st=$(ckpt_state)
    [ "$st" = running ] || { err="after the $which checkpoint --leave-running the container is '${st:-gone}'"; return 1; }
    ckpt_wait_count "$at" 60 || { err="the count stood at $at after the $which checkpoint --leave-running"; return 1; }
  done

  ckpt_timed "row[ck_stop_ms]" "$ck_s" checkpoint-stop checkpoint --image-path "$img-stop" "$id" || return 1
  c=$(ckpt_count)
  row[count_at_stop]=$c
  ckpt_image stop "$img-stop"
  snooze 1
  [ "$(ckpt_count)" -eq "$c" ] || { err="the count went on after a checkpoint without --leave-running: $c, then $(ckpt_count)"; return 1; }
  st=$(ckpt_state)
  if [ "$rt" = runc ]; then
    # runc removes the container after such a checkpoint.
    [ -z "$st" ] || { err="after the stopping checkpoint runc still has the container, '$st'"; return 1; }
  else
    [ "$st" = stopped ] || { err="after the stopping checkpoint the container is '${st:-gone}'"; return 1; }
    ckpt_timed t 60 delete delete "$id" || return 1
  fi

  rm -f "$b/rootfs/verify"
  t0=${EPOCHREALTIME/./}
  ckpt_timed "row[restore_ms]" 300 restore restore --detach --image-path "$img-stop" --bundle "$b" \
    --pid-file "$fast/$id.restored.pid" "$id" || return 1
  if ! ckpt_wait_count "$c" 120; then
    err="the restored container does not count: $seen, $c before"
    return 1
  fi
  t1=${EPOCHREALTIME/./}
  row[advance_ms]=$(((t1 - t0) / 1000))
  row[count_after]=$seen
  # The first number seen is checked: one below where it stood would be a
  # workload started anew (or a count gone back), never a restore.
  [ "$seen" -gt "$c" ] || { err="the count went back: $seen after $c"; return 1; }

  ckpt_timed t 60 kill kill "$id" USR1 || return 1
  local end=$((${EPOCHREALTIME/./} + (60 + n / 4) * 1000000)) v=""
  until [ -s "$b/rootfs/verify" ]; do
    [ "${EPOCHREALTIME/./}" -lt "$end" ] || { err="memhold never answered SIGUSR1 (its memory check)"; return 1; }
    snooze 0.1
  done
  read -r v <"$b/rootfs/verify" || true
  [[ $v == "ok "* ]] || { err="memory after restore: ${v:-empty}"; return 1; }
}

# ckpt_alive PID: whether PID is a live process (not a zombie: the test
# host's PID 1 may not reap what is reparented to it at once).
ckpt_alive() {
  local s
  { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  [ "${s%% *}" != Z ]
}

# Ends the container whatever happened, and fails the round (keeping its
# first error) if anything of it is left: its state, a process, an image.
ckpt_end() {
  local p pids=() left="" i argv
  for p in "$fast/$id.pid" "$fast/$id.restored.pid"; do
    [ -s "$p" ] && pids+=("$(cat "$p")")
  done
  ckpt_argv
  timeout 60 "${argv[@]}" delete --force "$id" </dev/null >/dev/null 2>>"$logs/$id.delete.err" || true
  for ((i = 0; i < 100; i++)); do
    left=""
    for p in "${pids[@]}"; do ckpt_alive "$p" && left+=" $p"; done
    [ -n "$left" ] || break
    snooze 0.1
  done
  if [ -d "$fast/state-$rt/$id" ]; then
    [ -n "$err" ] || err="left behind: its state $fast/state-$rt/$id"
    rm -rf "${fast:?}/state-$rt/$id"
  fi
  if [ -n "$left" ]; then
    [ -n "$err" ] || err="left behind: process(es)$left after delete --force"
    # shellcheck disable=SC2086 # pids, one a word
    kill -KILL $left 2>/dev/null || true
  fi
  # On a failure, what the runtimes wrote in the image directories, and
  # the test host's kernel log (an OOM kill is only said there).
  if [ -n "$err" ]; then
    for p in "$img"-*/dump.log "$img"-*/restore.log; do
      [ -f "$p" ] && cp "$p" "$logs/$id.$(basename "$(dirname "$p")").$(basename "$p")"
    done
    dmesg | tail -n 200 >"$logs/$id.dmesg" 2>/dev/null || true
    if grep -q 'Killed process' "$logs/$id.dmesg"; then
      err+=" [the test host's kernel killed: $(grep -o 'Killed process [0-9]* ([^)]*)' "$logs/$id.dmesg" | tail -n 1)]"
    fi
  fi
  rm -rf "$img"-* "$b" "$fast/$id.pid" "$fast/$id.restored.pid"
  find "$logs" -name "$id.*" -empty -delete 2>/dev/null || true
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = inner ]; then
  shift
  ckpt_rounds=0 ckpt_sizes=()
  ckpt_inner "$@"
fi
