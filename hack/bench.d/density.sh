# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, out, work, rounds...
# density        idle containers started one after another (`create` then
#                `start` of a busybox `sleep` bundle, detached, as podman
#                drives a runtime), krun-oci's series and then runc's, up to
#                KRUN_OCI_DENSITY_MAX containers each (default 100), or until
#                the host's MemAvailable falls below KRUN_OCI_DENSITY_FLOOR_MIB
#                (default 3072) or starting has taken KRUN_OCI_DENSITY_BUDGET_S
#                seconds (default 900). At N = 1, 2, 5, 10, 15, 20, 30, ...
#                (every 10) and the last N, 2 s after the N-th start: the host
#                Pss of every process of every container, per container, and
#                MemAvailable's drop since the series began, per container.
#                Reports the start time (create + start, wall ms) and
#                krun-oci's "host set-up" stage as N grows. Writes
#                density.tsv, density-starts.tsv and bench-density.png.

all_scenarios+=(density)

density_runtimes=(krun-oci runc)
density_max=${KRUN_OCI_DENSITY_MAX:-100}
density_floor_mib=${KRUN_OCI_DENSITY_FLOOR_MIB:-3072}
density_budget_s=${KRUN_OCI_DENSITY_BUDGET_S:-900}

# mem_available_kb: the host's MemAvailable, in KiB.
mem_available_kb() { awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo; }

# density_checkpoint N: whether the series samples memory after the N-th start.
density_checkpoint() {
  local n=$1
  [ "$n" -le 2 ] || [ "$n" -eq 5 ] || { [ "$n" -le 20 ] && [ $((n % 5)) -eq 0 ]; } || [ $((n % 10)) -eq 0 ]
}

# density_pss_kb PID...: the summed Pss (KiB) of PIDs and their descendants.
density_pss_kb() {
  local root p sum=0 v
  for root in "$@"; do
    for p in $(proc_tree "$root"); do
      v=$(awk '$1 == "Pss:" { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null) || continue
      sum=$((sum + ${v:-0}))
    done
  done
  echo "$sum"
}

# density_start RT ROOT BUNDLE ID: create + start, detached; sets `cpid`
# (the pid the runtime wrote), `wall` (ms) and `error`.
density_start() {
  local rt=$1 root=$2 bundle=$3 id=$4 argv t0 t1 log=()
  rt_argv "$rt" "$root"
  ! is_krun "$rt" || log=(--debug --log-format json --log "$(rt_log "$id")")
  live["$id"]="$rt $root"
  error="" cpid=""
  t0=${EPOCHREALTIME/./}
  if ! timeout 120 "${argv[@]}" "${log[@]}" create --bundle "$bundle" --pid-file "$work/io/$id.pid" "$id" \
    </dev/null >"$work/io/$id.out" 2>"$work/io/$id.err"; then
    error="create: $(tail -n 1 "$work/io/$id.err" | cut -c1-160)"
    return 0
  fi
  if ! timeout 60 "${argv[@]}" "${log[@]}" start "$id" </dev/null >>"$work/io/$id.out" 2>>"$work/io/$id.err"; then
    error="start: $(tail -n 1 "$work/io/$id.err" | cut -c1-160)"
    return 0
  fi
  t1=${EPOCHREALTIME/./}
  wall=$(ms $((t1 - t0)))
  cpid=$(cat "$work/io/$id.pid" 2>/dev/null) || error="no pid file"
}

scenario_density() {
  local bundle=$bundles/idle rt root n id cpid wall error t_begin avail0 avail pss setup pids stop
  "$here/mkbundle" "$bundle" sleep 100000
  printf 'runtime\tn\tpss_kb\tpss_per_ctr_kb\tavail_drop_per_ctr_kb\n' >"$out/density.tsv"
  printf 'runtime\tn\tstart_ms\thost_setup_ms\terror\n' >"$out/density-starts.tsv"
  : >"$work/density-starts"
  log "density: up to $density_max idle containers per runtime (${density_runtimes[*]}), MemAvailable floor ${density_floor_mib} MiB, ${density_budget_s} s a series"
  for rt in "${density_runtimes[@]}"; do
    root=$work/state/density-$(rt_slug "$rt")
    mkdir -p "$root"
    pids=()
    stop=""
    avail0=$(mem_available_kb)
    t_begin=$SECONDS
    for ((n = 1; n <= density_max; n++)); do
      id="bench-$$-dens-$(rt_slug "$rt")-$n"
      density_start "$rt" "$root" "$bundle" "$id"
      printf '%s\t%s\t%s\t%s\n' "$rt" "$n" "$([ -z "$error" ] && echo "$wall" || echo NA)" "$error" >>"$work/density-starts"
      if [ -n "$error" ]; then
        stop="start $n failed: $error"
        break
      fi
      pids+=("$cpid")
      avail=$(mem_available_kb)
      if density_checkpoint "$n" || [ "$n" -eq "$density_max" ] ||
        [ $((avail / 1024)) -lt "$density_floor_mib" ] || [ $((SECONDS - t_begin)) -ge "$density_budget_s" ]; then
        sleep 2
        avail=$(mem_available_kb)
        pss=$(density_pss_kb "${pids[@]}")
        printf '%s\t%s\t%s\t%s\t%s\n' "$rt" "$n" "$pss" $((pss / n)) $(((avail0 - avail) / n)) >>"$out/density.tsv"
        printf '  %s: %d running, Pss %d MiB (%d MiB each), MemAvailable %d MiB\n' \
          "$rt" "$n" $((pss / 1024)) $((pss / n / 1024)) $((avail / 1024)) >&2
      fi
      if [ $((avail / 1024)) -lt "$density_floor_mib" ]; then
        stop="MemAvailable below ${density_floor_mib} MiB after $n"
        break
      fi
      if [ $((SECONDS - t_begin)) -ge "$density_budget_s" ]; then
        stop="time budget of ${density_budget_s} s spent after $n"
        break
      fi
    done
    echo "${rt}: ${stop:-reached $density_max}" >>"$work/density-stops"
    log "density: $rt ${stop:-reached $density_max}; removing its containers"
    for id in "${!live[@]}"; do
      [[ $id == "bench-$$-dens-$(rt_slug "$rt")-"* ]] || continue
      # shellcheck disable=SC2086
      rt_delete ${live[$id]} "$id"
    done
  done
  # krun-oci logs its stages ("timings") when a container's VM stops.
  local start err
  while IFS=$'\t' read -r rt n start err; do
    setup=NA
    if is_krun "$rt"; then
      setup=$(jq -Rrs 'split("\n") | map(fromjson? // empty) | map(select(.msg == "timings")) | .[0].host_setup_ms // "NA"' \
        "$(rt_log "bench-$$-dens-$(rt_slug "$rt")-$n")" 2>/dev/null) || setup=NA
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$rt" "$n" "$start" "$setup" "$err" >>"$out/density-starts.tsv"
  done <"$work/density-starts"
}

report_density() {
  echo "Density: idle \`sleep\` containers started one after another (create + start, detached)."
  echo "Pss: every host process of every running container, summed, divided by N (2 s after"
  echo "the N-th start); avail: the drop of the host's MemAvailable since the series began,"
  echo "divided by N (it also counts the page cache and kernel memory the containers cost)."
  echo "start: create + start wall time of the N-th container; host set-up: krun-oci's stage."
  echo
  sed 's/^/  /' "$work/density-stops" 2>/dev/null || true
  echo
  awk -F'\t' -v order="${density_runtimes[*]}" '
    FNR == 1 { file++; next }
    file == 1 { k = $1 SUBSEP $2; pss[k] = $4; avail[k] = $5; seen[k] = 1; next }
    { k = $1 SUBSEP $2; start[k] = $3; setup[k] = $4; if ($3 != "NA") { last[$1] = $2 } }
    function num(x) { return x ~ /^[0-9.]+$/ ? sprintf("%.1f", x) : "NA" }
    END {
      printf "  %-9s %5s %12s %14s %10s %14s\n", "runtime", "N", "Pss/ctr MiB", "avail/ctr MiB", "start ms", "host set-up ms"
      n = split(order, rts, " ")
      for (j = 1; j <= n; j++) {
        rt = rts[j]
        for (i = 1; i <= last[rt]; i++) {
          k = rt SUBSEP i
          if (!(k in seen)) continue
          printf "  %-9s %5d %12.1f %14.1f %10s %14s\n", rt, i, pss[k] / 1024, avail[k] / 1024, num(start[k]), num(setup[k])
        }
      }
    }' "$out/density.tsv" "$out/density-starts.tsv"
  echo
  local rt n med
  for rt in "${density_runtimes[@]}"; do
    read -r n med _ _ < <(awk -F'\t' -v rt="$rt" 'NR > 1 && $1 == rt && $3 != "NA" { print $3 }' "$out/density-starts.tsv" | stats)
    printf '  %s: median start %s ms over %s starts' "$rt" "$med" "$n"
    read -r n med _ _ < <(awk -F'\t' -v rt="$rt" 'NR > 1 && $1 == rt && $4 ~ /^[0-9.]+$/ { print $4 }' "$out/density-starts.tsv" | stats)
    [ "$n" -eq 0 ] || printf ', median host set-up %s ms' "$med"
    printf '\n'
  done
}

plot_density() {
  [ "$(wc -l <"$out/density.tsv")" -gt 1 ] || return 0
  local rt
  for rt in "${density_runtimes[@]}"; do
    awk -F'\t' -v rt="$rt" '$1 == rt { print $2 "\t" $4 / 1024 }' "$out/density.tsv" >"$out/plot-density-pss-$rt.dat"
    awk -F'\t' -v rt="$rt" '$1 == rt && $3 != "NA" { print $2 "\t" $3 }' "$out/density-starts.tsv" >"$out/plot-density-start-$rt.dat"
  done
  {
    echo "set terminal pngcairo size 1100,480 font \"DejaVu Sans,11\" noenhanced"
    echo "set output \"$out/bench-density.png\""
    # shellcheck disable=SC2028 # gnuplot reads the \t
    echo "set datafile separator \"\\t\""
    echo "set multiplot layout 1,2 title \"density: idle containers started one after another\""
    echo "set grid; set key top left; set xlabel \"containers running (N)\"; set yrange [0:*]"
    echo "set ylabel \"host Pss per container, MiB\"; set title \"memory\""
    printf 'plot '
    for rt in "${density_runtimes[@]}"; do printf "'plot-density-pss-%s.dat' using 1:2 with linespoints title \"%s\", " "$rt" "$rt"; done
    echo
    echo "set ylabel \"create + start, ms\"; set title \"start time of the N-th\""
    printf 'plot '
    for rt in "${density_runtimes[@]}"; do printf "'plot-density-start-%s.dat' using 1:2 with points pt 7 ps 0.5 title \"%s\", " "$rt" "$rt"; done
    echo
    echo "unset multiplot"
  } | sed 's/, $//' >"$out/bench-density.gp"
  (cd "$out" && gnuplot bench-density.gp) || { echo "gnuplot failed on $out/bench-density.gp" >&2; return 0; }
  echo "plot: $out/bench-density.png"
}
