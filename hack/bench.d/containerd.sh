# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, top, out, work, rounds...
# containerd     our shim against containerd's runc shim (issue #5), in a
#                private containerd 2.x (hack/containerd-env start, under the
#                bench's work folder; stopped on exit or interrupt):
#                - `ctr run --rm --runtime io.containerd.{krun,runc}.v2
#                  localhost/krun-busybox:latest ID sh -c 'echo hi'`, wall
#                  time from the start of ctr to its exit, interleaved;
#                - pod start to container running through the CRI (what
#                  kubelet waits for: RunPodSandbox, then CreateContainer +
#                  StartContainer of `sleep 1000` until ContainerStatus says
#                  running), handlers krun and runc, interleaved, by
#                  krun-e2e's cri-pod-start (built with cargo), on a CNI bridge
#                  of the bench's own (kbench0, 10.233.0.0/24).
#                1 warm-up round, then -n rounds. Writes containerd.tsv,
#                cri-pods.tsv and bench-containerd.png to DIR.

all_scenarios+=(containerd)

ctrd_shims=(krun runc)
ctrd_image=localhost/krun-busybox:latest
ctrd_dir=""
ctrd_ctr=""

# ctrd_cleanup: stops the private containerd with its shims, VMs and
# containers, and removes what CNI left on the host. A cleanup hook of the
# core (it runs on exit and interrupt, before $work goes); idempotent.
ctrd_cleanup() {
  [ -n "$ctrd_dir" ] || return 0
  # Pods that an interrupted cri-pod-start left: removed through the CRI, as
  # only containerd knows their network namespaces (in /run/netns).
  if [ -S "$ctrd_dir/containerd.sock" ] && [ -x "$top/target/release/cri-pod-start" ]; then
    timeout 120 "$top/target/release/cri-pod-start" --socket "$ctrd_dir/containerd.sock" \
      --remove-pods >/dev/null 2>&1 || true
  fi
  timeout 120 "$here/containerd-env" stop "$ctrd_dir" >/dev/null 2>&1 || true
  ip link del kbench0 2>/dev/null || true
  rm -rf /var/lib/cni/networks/krun-bench
  ctrd_dir=""
}

# ctrd_interrupted RC: exits (the core's trap cleans up) if RC says that the
# command ended by Ctrl-C or a TERM/HUP: `timeout --foreground` and ctr report
# that as an exit status, and bash then lets the signal go.
ctrd_interrupted() {
  case $1 in
    129 | 130 | 143) echo "hack/bench: interrupted, cleaning up" >&2; exit "$1" ;;
  esac
}

# ctrd_run ROUND SHIM: one timed `ctr run --rm`, appended to containerd.tsv.
ctrd_run() {
  local r=$1 shim=$2 id="bench-$1-$2" t0 t1 rc=0 error=""
  t0=${EPOCHREALTIME/./}
  # ctr itself (not hack/containerd-env's wrapper), in the foreground: a
  # Ctrl-C reaches it and so ends the bench (plain timeout would shield it).
  timeout --foreground 300 "$ctrd_ctr" --address "$ctrd_dir/containerd.sock" run --rm \
    --runtime "io.containerd.$shim.v2" "$ctrd_image" "$id" sh -c 'echo hi' \
    </dev/null >"$work/ctrd-$id.out" 2>"$work/ctrd-$id.err" || rc=$?
  t1=${EPOCHREALTIME/./}
  ctrd_interrupted "$rc"
  if [ "$rc" -ne 0 ]; then
    error="exit $rc: $(grep -v '^[[:space:]]*$' "$work/ctrd-$id.err" | tail -n 1 | tr '\t' ' ' | cut -c1-200)"
    # What a failed or killed run may leave behind.
    timeout 20 "$ctrd_ctr" --address "$ctrd_dir/containerd.sock" tasks kill -s KILL "$id" >/dev/null 2>&1 || true
    timeout 20 "$ctrd_ctr" --address "$ctrd_dir/containerd.sock" tasks delete -f "$id" >/dev/null 2>&1 || true
    timeout 20 "$ctrd_ctr" --address "$ctrd_dir/containerd.sock" containers rm "$id" >/dev/null 2>&1 || true
  elif [ "$(cat "$work/ctrd-$id.out")" != hi ]; then
    error="printed '$(head -c 60 "$work/ctrd-$id.out" | tr '\n\t' '  ')', not 'hi'"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$shim" "$(ms $((t1 - t0)))" \
    "$([ -z "$error" ] && echo ok || echo failed)" "$error" >>"$out/containerd.tsv"
  [ -z "$error" ] || printf '  ctr run --runtime io.containerd.%s.v2, round %s failed: %s\n' "$shim" "$r" "$error" >&2
  rm -f "$work/ctrd-$id.out" "$work/ctrd-$id.err"
}

scenario_containerd() {
  local r i k=${#ctrd_shims[@]} client rc
  log "containerd: building the CRI client cri-pod-start (crate krun-e2e)"
  (cd "$top" && cargo build --release --locked -p krun-e2e --bin cri-pod-start >&2) ||
    die "cargo build --bin cri-pod-start failed"
  client=$top/target/release/cri-pod-start
  # Registered before the start, so that an interrupted start is undone too.
  cleanup_hooks+=(ctrd_cleanup)
  ctrd_dir=$work/ctrd
  log "containerd: starting a private containerd in $ctrd_dir"
  "$here/containerd-env" start "$ctrd_dir" >/dev/null ||
    die "hack/containerd-env start failed (log: $ctrd_dir/containerd.log)"
  ctrd_ctr=$(sed -n 's|^KRUN_OCI_CONTAINERD_BIN=||p' "$ctrd_dir/env")/ctr
  [ -x "$ctrd_ctr" ] || die "no ctr at $ctrd_ctr (from $ctrd_dir/env)"
  cat >"$ctrd_dir/cni/10-krun-bench.conflist" <<'EOF'
{"cniVersion": "1.0.0", "name": "krun-bench", "plugins": [{"type": "bridge", "bridge": "kbench0",
 "isGateway": true, "ipMasq": false, "ipam": {"type": "host-local",
 "ranges": [[{"subnet": "10.233.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF

  printf 'round\tshim\tms\tstatus\terror\n' >"$out/containerd.tsv"
  log "containerd: 1 warm-up + $rounds rounds of ctr run --rm, shims ${ctrd_shims[*]} interleaved"
  for ((r = 0; r <= rounds; r++)); do
    for ((i = 0; i < k; i++)); do
      ctrd_run "$r" "${ctrd_shims[(r + i) % k]}"
    done
    printf '  round %d/%d done\n' "$r" "$rounds" >&2
  done

  rm -f "$out/cri-pods.tsv"
  log "containerd: 1 warm-up + $rounds rounds of pod start through the CRI, handlers ${ctrd_shims[*]} interleaved"
  rc=0
  timeout --foreground $((600 + 400 * rounds)) "$client" --socket "$ctrd_dir/containerd.sock" \
    --handler "$(
      IFS=,
      echo "${ctrd_shims[*]}"
    )" --image "$ctrd_image" --rounds "$rounds" --out "$out/cri-pods.tsv" \
    --logs "$work/ctrd-pod-logs" || rc=$?
  ctrd_interrupted "$rc"
  if [ "$rc" -ne 0 ]; then
    [ -s "$out/cri-pods.tsv" ] ||
      printf 'round\thandler\trun_pod_ms\tcontainer_running_ms\ttotal_ms\tstatus\terror\n' >"$out/cri-pods.tsv"
    # rows of round 1 (counted by the report) saying why nothing more came
    for shim in "${ctrd_shims[@]}"; do
      printf '1\t%s\tNA\tNA\tNA\tfailed\tcri-pod-start exited with %s\n' "$shim" "$rc" >>"$out/cri-pods.tsv"
    done
    echo "  cri-pod-start exited with $rc" >&2
  fi
  ctrd_cleanup
}

# ctrd_values TSV SHIM COLUMN STATUS_COLUMN: COLUMN (a number) of SHIM's
# timed (round > 0) rows whose status is ok.
ctrd_values() {
  awk -F'\t' -v s="$2" -v c="$3" -v st="$4" 'NR > 1 && $1 > 0 && $2 == s && $st == "ok" && $c ~ /^[0-9.]+$/ { print $c }' "$1"
}

# ctrd_failed TSV SHIM STATUS_COLUMN: "N LAST_ERROR" of SHIM's failed timed rows.
ctrd_failed() {
  awk -F'\t' -v s="$2" -v c="$3" '$1 > 0 && $2 == s && $c == "failed" { n++; e = $(c + 1) } END { printf "%d %s\n", n, e }' "$1"
}

report_containerd() {
  local shim n med min max base ratio col name nf err version tsv=$out/cri-pods.tsv oom=0
  local -A said=()
  version=$("$KRUN_OCI_CACHE/containerd/bin/containerd" --version 2>/dev/null | awk '{ print $3 }')
  echo "containerd ${version:-2.x} (hack/containerd-env), image $ctrd_image; ms,"
  echo "$rounds rounds after 1 warm-up, shims/handlers interleaved (the order rotates each round)."
  echo
  echo "  ctr run --rm --runtime io.containerd.SHIM.v2 IMAGE ID sh -c 'echo hi': wall time, start of ctr to its exit"
  printf '  %-40s %10s %19s %8s %5s\n' shim "median ms" "min-max ms" "x runc" runs
  read -r _ base _ _ < <(ctrd_values "$out/containerd.tsv" runc 3 4 | stats)
  for shim in "${ctrd_shims[@]}"; do
    read -r n med min max < <(ctrd_values "$out/containerd.tsv" "$shim" 3 4 | stats)
    read -r nf err < <(ctrd_failed "$out/containerd.tsv" "$shim" 4)
    if [ "$n" -eq 0 ]; then
      printf '  %-40s FAILED: %s\n' "io.containerd.$shim.v2" "${err:-no runs}"
      continue
    fi
    ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2fx", a / b; else print "n/a" }')
    printf '  %-40s %10s %19s %8s %5s%s\n' "io.containerd.$shim.v2" "$med" "$min-$max" "$ratio" "$n" \
      "$([ "$nf" -eq 0 ] || echo "  ($nf failed)")"
  done
  echo
  echo "  pod start through the CRI (cri-pod-start): RunPodSandbox, then CreateContainer +"
  echo "  StartContainer of \`sleep 1000\` until ContainerStatus says RUNNING (polled every 5 ms)"
  printf '  %-32s %-7s %10s %19s %8s %5s\n' stage handler "median ms" "min-max ms" "x runc" runs
  for col in 3:RunPodSandbox 4:"create+start to running" 5:"total: pod start to running"; do
    name=${col#*:}
    read -r _ base _ _ < <(ctrd_values "$tsv" runc "${col%%:*}" 6 | stats)
    for shim in "${ctrd_shims[@]}"; do
      read -r n med min max < <(ctrd_values "$tsv" "$shim" "${col%%:*}" 6 | stats)
      read -r nf err < <(ctrd_failed "$tsv" "$shim" 6)
      if [ "$n" -eq 0 ]; then
        # the reason once, on the handler's first row
        if [ -n "${said[$shim]:-}" ]; then
          printf '  %-32s %-7s FAILED (as above)\n' "$name" "$shim"
        else
          said[$shim]=1
          [ "${#err}" -le 120 ] || err="...${err: -117}"
          printf '  %-32s %-7s FAILED: %s\n' "$name" "$shim" "${err:-no runs}"
        fi
        [[ $err != *"final child's PID from pipe"* ]] || oom=1
      else
        ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2fx", a / b; else print "n/a" }')
        printf '  %-32s %-7s %10s %19s %8s %5s%s\n' "$name" "$shim" "$med" "$min-$max" "$ratio" "$n" \
          "$([ "$nf" -eq 0 ] || echo "  ($nf failed)")"
      fi
      name=""
    done
  done
  if [ "$oom" -eq 1 ]; then
    echo
    echo "  runc's \"can't get final child's PID from pipe: EOF\": its nsexec cannot write the sandbox's"
    echo "  oom_score_adj -998 (the host denies CAP_SYS_RESOURCE); containerd's"
    echo "  restrict_oom_score_adj = true (CRI runtime plugin) avoids it."
  fi
}

# ctrd_plot_rows TSV COLUMN STATUS_COLUMN LABEL: a bar a shim, numbered on
# from $x, with the median, min and max of COLUMN (a number) of its timed
# rows, labelled "LABEL SHIM"; a failed one as a labelled gap (gnuplot
# skips the NaN), "LABEL's first word, SHIM FAILED".
ctrd_plot_rows() {
  local shim n med min max
  for shim in "${ctrd_shims[@]}"; do
    x=$((x + 1))
    read -r n med min max < <(ctrd_values "$1" "$shim" "$2" "$3" | stats)
    if [ "$n" -eq 0 ]; then
      printf '%s\t%s %s FAILED\tNaN\tNaN\tNaN\n' "$x" "${4%% *}" "$shim"
    else
      printf '%s\t%s\t%s\t%s\t%s\n' "$x" "$4 $shim" "$med" "$min" "$max"
    fi
  done
}

plot_containerd() {
  local x=0
  printf 'x\tlabel\tmedian\tmin\tmax\n' >"$out/plot-containerd.dat"
  ctrd_plot_rows "$out/containerd.tsv" 3 4 "ctr run" >>"$out/plot-containerd.dat"
  ctrd_plot_rows "$out/cri-pods.tsv" 5 6 "pod start" >>"$out/plot-containerd.dat"
  bar_plot containerd "containerd: ctr run --rm, CRI pod start ($rounds rounds)" "ms"
}
