# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, out, work, rounds...
# podman         podman driving krun-oci and runc side by side (issue #4),
#                through the private set-up of hack/podman-env (a store of
#                its own under DIR's work folder, image localhost/krun-busybox):
#                - `podman run --rm IMAGE true`, wall time, interleaved;
#                - `podman exec CTR true` into one running container per
#                  runtime, wall time, interleaved.
#                1 warm-up round, then -n rounds. Writes podman.tsv and
#                bench-podman.png to DIR.

all_scenarios+=(podman)

podman_runtimes=(krun-oci runc)

# pm ARG...: podman with the bench's own store.
pm() {
  "$here/podman-env" exec --state "$work/podman" -- podman "$@"
}

podman_cleanup() {
  [ -d "$work/podman" ] || return 0
  timeout 60 "$here/podman-env" exec --state "$work/podman" -- podman rm -f -a -t 0 >/dev/null 2>&1 || true
}

# podman_time VAR ARG...: runs `podman ARG...` with the bench's store (output
# to the log), sets VAR to its wall time in ms, or to "failed".
podman_time() {
  local var=$1 t0 t1 rc=0
  shift
  t0=${EPOCHREALTIME/./}
  timeout 300 "$here/podman-env" exec --state "$work/podman" -- podman "$@" >>"$work/podman.log" 2>&1 || rc=$?
  t1=${EPOCHREALTIME/./}
  if [ "$rc" -eq 0 ]; then
    printf -v "$var" '%s' "$(ms $((t1 - t0)))"
  else
    printf -v "$var" 'failed'
  fi
}

scenario_podman() {
  local r i rt k=${#podman_runtimes[@]} t
  "$here/podman-env" >/dev/null
  mkdir -p "$work/podman"
  # The core's cleanup removes $work; the containers must go first.
  cleanup_hooks+=(podman_cleanup)
  printf 'round\truntime\twhat\tms\n' >"$out/podman.tsv"
  log "podman: 1 warm-up + $rounds rounds of run --rm true and exec, ${podman_runtimes[*]}"
  for rt in "${podman_runtimes[@]}"; do
    pm --runtime "$rt" run -d --name "bench-$rt" --network none localhost/krun-busybox sleep 100000 \
      >>"$work/podman.log" 2>&1 || die "podman run -d with $rt failed (log: $work/podman.log)"
  done
  for ((r = 0; r <= rounds; r++)); do
    for ((i = 0; i < k; i++)); do
      rt=${podman_runtimes[(r + i) % k]}
      podman_time t --runtime "$rt" run --rm --network none localhost/krun-busybox true
      printf '%s\t%s\trun\t%s\n' "$r" "$rt" "$t" >>"$out/podman.tsv"
      podman_time t exec "bench-$rt" true
      printf '%s\t%s\texec\t%s\n' "$r" "$rt" "$t" >>"$out/podman.tsv"
    done
    printf '  round %d/%d done\n' "$r" "$rounds" >&2
  done
  podman_cleanup
}

# podman_values RT WHAT: the timed (round > 0) values.
podman_values() {
  awk -F'\t' -v rt="$1" -v w="$2" 'NR > 1 && $1 > 0 && $2 == rt && $3 == w && $4 ~ /^[0-9.]+$/ { print $4 }' "$out/podman.tsv"
}

report_podman() {
  local what rt n med min max base ratio failed
  echo "podman (hack/podman-env's private store, --network none, image localhost/krun-busybox):"
  echo "wall time of the podman command, ms; $rounds rounds after 1 warm-up, runtimes interleaved."
  echo
  printf '  %-28s %-9s %10s %19s %9s %5s\n' command runtime "median ms" "min-max ms" "x runc" runs
  for what in run exec; do
    read -r _ base _ _ < <(podman_values runc "$what" | stats)
    for rt in "${podman_runtimes[@]}"; do
      read -r n med min max < <(podman_values "$rt" "$what" | stats)
      failed=$(awk -F'\t' -v rt="$rt" -v w="$what" '$1 > 0 && $2 == rt && $3 == w && $4 == "failed"' "$out/podman.tsv" | wc -l)
      ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2fx", a / b; else print "n/a" }')
      printf '  %-28s %-9s %10s %19s %9s %5s%s\n' \
        "$([ "$what" = run ] && echo 'run --rm IMAGE true' || echo 'exec CTR true')" \
        "$rt" "$med" "$min-$max" "$ratio" "$n" "$([ "$failed" -eq 0 ] || echo "  ($failed failed)")"
    done
  done
}

plot_podman() {
  local what rt x=0 n med min max
  printf 'x\tlabel\tmedian\tmin\tmax\n' >"$out/plot-podman.dat"
  for what in run exec; do
    for rt in "${podman_runtimes[@]}"; do
      x=$((x + 1))
      read -r n med min max < <(podman_values "$rt" "$what" | stats)
      [ "$n" -gt 0 ] || continue
      printf '%s\t%s\t%s\t%s\t%s\n' "$x" "$what $rt" "$med" "$min" "$max" >>"$out/plot-podman.dat"
    done
  done
  bar_plot podman "podman: run --rm true and exec latency ($rounds rounds)" "ms"
}
