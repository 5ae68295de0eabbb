# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, top, out, work, rounds...
# containerd     our shim against containerd's runc shim (issue #5), in a
#                private containerd 2.x (hack/containerd-env start):
#                - `ctr run --rm --runtime io.containerd.{krun,runc}.v2
#                  IMAGE ID sh -c 'echo hi'`, start to exit, interleaved;
#                - pod start to container running through the CRI (what
#                  kubelet waits for: RunPodSandbox, CreateContainer,
#                  StartContainer until running), handlers krun and runc,
#                  on a CNI bridge network of the bench's own (kbench0,
#                  10.233.0.0/24), by the example cri-pod-start (all rounds
#                  of one handler, then the other).
#                1 warm-up round, then -n rounds. Writes containerd.tsv,
#                cri-pods.tsv and bench-containerd.png to DIR.

all_scenarios+=(containerd)

ctrd_shims=(krun runc)

ctrd_cleanup() {
  [ -n "${ctrd_dir:-}" ] || return 0
  "$here/containerd-env" stop "$ctrd_dir" >/dev/null 2>&1 || true
  ip link del kbench0 2>/dev/null || true
  rm -rf /var/lib/cni/networks/krun-bench
}

scenario_containerd() {
  local r i k=${#ctrd_shims[@]} shim t0 t1 rc example
  ctrd_dir=$work/ctrd
  cleanup_hooks+=(ctrd_cleanup)
  log "containerd: building the CRI client example"
  (cd "$top" && cargo build --release --locked --example cri-pod-start -p krun-oci >&2)
  example=$top/target/release/examples/cri-pod-start
  "$here/containerd-env" start "$ctrd_dir" >/dev/null
  cat >"$ctrd_dir/cni/10-krun-bench.conflist" <<'EOF'
{"cniVersion": "1.0.0", "name": "krun-bench", "plugins": [{"type": "bridge", "bridge": "kbench0",
 "isGateway": true, "ipMasq": false, "ipam": {"type": "host-local",
 "ranges": [[{"subnet": "10.233.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  printf 'round\tshim\tms\tstatus\n' >"$out/containerd.tsv"
  log "containerd: 1 warm-up + $rounds rounds of ctr run --rm, shims ${ctrd_shims[*]}"
  for ((r = 0; r <= rounds; r++)); do
    for ((i = 0; i < k; i++)); do
      shim=${ctrd_shims[(r + i) % k]}
      rc=0
      t0=${EPOCHREALTIME/./}
      timeout 300 "$here/containerd-env" ctr "$ctrd_dir" run --rm --runtime "io.containerd.$shim.v2" \
        localhost/krun-busybox:latest "bench-$r-$shim" sh -c 'echo hi' >>"$work/ctrd.log" 2>&1 || rc=$?
      t1=${EPOCHREALTIME/./}
      printf '%s\t%s\t%s\t%s\n' "$r" "$shim" "$(ms $((t1 - t0)))" "$([ "$rc" -eq 0 ] && echo ok || echo "exit $rc")" >>"$out/containerd.tsv"
    done
    printf '  round %d/%d done\n' "$r" "$rounds" >&2
  done
  printf 'round\thandler\trun_pod_ms\tcontainer_running_ms\ttotal_ms\tstatus\terror\n' >"$out/cri-pods.tsv"
  for shim in "${ctrd_shims[@]}"; do
    log "containerd: pod start through the CRI, handler $shim, 1 warm-up + $rounds rounds"
    timeout 1800 "$example" "$ctrd_dir/containerd.sock" "$shim" localhost/krun-busybox:latest "$rounds" "$out/cri-pods.tsv" ||
      printf '0\t%s\tNA\tNA\tNA\tfailed\tcri-pod-start exited %s\n' "$shim" "$?" >>"$out/cri-pods.tsv"
  done
  ctrd_cleanup
}

report_containerd() {
  local shim n med min max base ratio col name err
  echo "containerd 2.x (hack/containerd-env), image localhost/krun-busybox; ms, $rounds rounds after 1 warm-up."
  echo
  read -r _ base _ _ < <(awk -F'\t' 'NR > 1 && $1 > 0 && $2 == "runc" && $4 == "ok" { print $3 }' "$out/containerd.tsv" | stats)
  printf '  %-44s %-6s %10s %19s %8s %5s\n' "ctr run --rm IMAGE ID sh -c 'echo hi'" shim "median" "min-max" "x runc" runs
  for shim in "${ctrd_shims[@]}"; do
    read -r n med min max < <(awk -F'\t' -v s="$shim" 'NR > 1 && $1 > 0 && $2 == s && $4 == "ok" { print $3 }' "$out/containerd.tsv" | stats)
    ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2fx", a / b; else print "n/a" }')
    printf '  %-44s %-6s %10s %19s %8s %5s\n' "" "$shim" "$med" "$min-$max" "$ratio" "$n"
  done
  echo
  printf '  %-44s %-6s %10s %19s %5s\n' "pod start through the CRI" handler median min-max runs
  for col in 3:RunPodSandbox 4:"Create+StartContainer to running" 5:"total: pod start to container running"; do
    name=${col#*:}
    for shim in "${ctrd_shims[@]}"; do
      read -r n med min max < <(awk -F'\t' -v s="$shim" -v c="${col%%:*}" 'NR > 1 && $1 > 0 && $2 == s && $6 == "ok" { print $c }' "$out/cri-pods.tsv" | stats)
      if [ "$n" -eq 0 ]; then
        err=$(awk -F'\t' -v s="$shim" '$2 == s && $6 == "failed" { e = $7 } END { print (length(e) > 110 ? "..." substr(e, length(e) - 106) : e) }' "$out/cri-pods.tsv")
        printf '  %-44s %-6s FAILED: %s\n' "$name" "$shim" "${err:-no runs}"
      else
        printf '  %-44s %-6s %10s %19s %5s\n' "$name" "$shim" "$med" "$min-$max" "$n"
      fi
      name=""
    done
  done
}

plot_containerd() {
  local shim x=0 n med min max
  printf 'x\tlabel\tmedian\tmin\tmax\n' >"$out/plot-containerd.dat"
  for shim in "${ctrd_shims[@]}"; do
    x=$((x + 1))
    read -r n med min max < <(awk -F'\t' -v s="$shim" 'NR > 1 && $1 > 0 && $2 == s && $4 == "ok" { print $3 }' "$out/containerd.tsv" | stats)
    [ "$n" -eq 0 ] || printf '%s\t%s\t%s\t%s\t%s\n' "$x" "ctr run $shim" "$med" "$min" "$max" >>"$out/plot-containerd.dat"
  done
  for shim in "${ctrd_shims[@]}"; do
    x=$((x + 1))
    read -r n med min max < <(awk -F'\t' -v s="$shim" 'NR > 1 && $1 > 0 && $2 == s && $6 == "ok" { print $5 }' "$out/cri-pods.tsv" | stats)
    [ "$n" -eq 0 ] || printf '%s\t%s\t%s\t%s\t%s\n' "$x" "pod start $shim" "$med" "$min" "$max" >>"$out/plot-containerd.dat"
  done
  bar_plot containerd "containerd: ctr run --rm and CRI pod start ($rounds rounds)" "ms"
}
