# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, top, out, work, rounds...
# net            network throughput and latency through the container's
#                network namespace (issue #6): two namespaces joined by a
#                veth pair (made, and removed even on Ctrl-C, by the bench);
#                netperf (guest-init/examples/netperf.rs, built static
#                into target/dist/tools by hack/build) serves in one; its client runs
#                in a busybox container in the other, under krun-oci (the
#                namespace carried into the VM by tap + tc redirect) and
#                runc (the same bundle and namespace path), and natively in
#                the namespace (`ip netns exec`, no container). Each run:
#                - TCP throughput, container -> server: zeros sent for
#                  KRUN_OCI_BENCH_NET_SECONDS (default 5) s, counted and
#                  timed by the server;
#                - TCP round trip: KRUN_OCI_BENCH_NET_COUNT (default 2000)
#                  1-byte ping-pongs on one connection (TCP_NODELAY), the
#                  run's median and p99, timed by the server (a guest's
#                  clock under TCG moves in 4 ms steps).
#                Interleaved, the order rotating; 1 warm-up, then -n rounds.
#                KRUN_OCI_BENCH_NET_HYPERVISORS (e.g. "builtin qemu") runs
#                krun-oci once per backend named (modes krun-oci/builtin,
#                krun-oci/qemu; the bundle's io.krun-oci.hypervisor
#                annotation picks it) instead of once on its own choice.
#                The built-in VMM needs a KVM that boots Linux; here:
#                hack/nested run --timeout 1800 -- env
#                KRUN_OCI_BENCH_NET_HYPERVISORS="builtin qemu" hack/bench -s net
#                Writes net.tsv, bench-net.png (throughput) and
#                bench-net-rtt.png (round trip) to DIR.

all_scenarios+=(net)

net_modes=(krun-oci runc native)
if [ -n "${KRUN_OCI_BENCH_NET_HYPERVISORS:-}" ]; then
  net_modes=()
  for h in $KRUN_OCI_BENCH_NET_HYPERVISORS; do
    [[ $h == builtin || $h == qemu ]] || die "KRUN_OCI_BENCH_NET_HYPERVISORS: $h is not builtin or qemu"
    net_modes+=("krun-oci/$h")
  done
  net_modes+=(runc native)
fi
net_seconds=${KRUN_OCI_BENCH_NET_SECONDS:-5}
net_count=${KRUN_OCI_BENCH_NET_COUNT:-2000}
# Unique per bench process: two namespaces and the veth pair's two ends.
net_c="krun-bench-$$-c"
net_s="krun-bench-$$-s"
net_vc="kb$$c"
net_vs="kb$$s"
net_addr=10.234.0.1:5201
net_server_pid=""

# The cleanup hook (also run at the scenario's end): ends the server and
# removes the namespaces, which takes the veth pair with them. Containers
# still running in the client namespace are the core's to end (they are in
# `pids` and `live`); the namespace itself goes with its last process.
net_cleanup() {
  if [ -n "$net_server_pid" ]; then
    kill_tree "$net_server_pid"
    net_server_pid=""
  fi
  # A pair not yet moved into the namespaces (interrupted while wiring).
  ip link del "$net_vc" 2>/dev/null || true
  ip link del "$net_vs" 2>/dev/null || true
  ip netns del "$net_c" 2>/dev/null || true
  ip netns del "$net_s" 2>/dev/null || true
}

# net_client BIN: the client's command line (throughput, then round trip).
net_client() {
  echo "$1 client $net_addr throughput $net_seconds && $1 client $net_addr latency $net_count"
}

scenario_net() {
  local b=$bundles/net bin r i ns mode k=${#net_modes[@]}
  [[ $net_seconds =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_NET_SECONDS wants a positive number of seconds"
  [[ $net_count =~ ^[1-9][0-9]*$ ]] || die "KRUN_OCI_BENCH_NET_COUNT wants a positive number of round trips"

  bin=$top/target/dist/tools/netperf
  if [ ! -x "$bin" ] || [ "$top/guest-init/examples/netperf.rs" -nt "$bin" ]; then
    die "net: $bin is missing or older than its source: run hack/build"
  fi
  ! ldd "$bin" 2>/dev/null | grep -q '=>' || die "$bin is not static"

  "$here/mkbundle" "$b" sh -c "$(net_client /bin/netperf)"
  install -m 0755 "$bin" "$b/rootfs/bin/netperf"
  # The container joins the client namespace by path.
  jq --arg ns "/run/netns/$net_c" '
      .linux.namespaces = [.linux.namespaces[] | select(.type != "network")] + [{type: "network", path: $ns}]' \
    "$b/config.json" >"$b/config.json.new" && mv "$b/config.json.new" "$b/config.json"
  # One config per backend asked for, on the same rootfs.
  for mode in "${net_modes[@]}"; do
    [[ $mode == krun-oci/* ]] || continue
    jq --arg h "${mode#*/}" --arg root "$b/rootfs" '.annotations["io.krun-oci.hypervisor"] = $h | .root.path = $root' \
      "$b/config.json" >"$b/config-${mode#*/}.json"
    mkdir -p "$b-${mode#*/}"
    mv "$b/config-${mode#*/}.json" "$b-${mode#*/}/config.json"
  done

  cleanup_hooks+=(net_cleanup)
  log "net: wiring $net_c <-> $net_s (veth)"
  ip netns add "$net_c"
  ip netns add "$net_s"
  ip link add "$net_vc" type veth peer name "$net_vs"
  ip link set "$net_vc" netns "$net_c"
  ip link set "$net_vs" netns "$net_s"
  ip -n "$net_c" link set "$net_vc" name eth0
  ip -n "$net_s" link set "$net_vs" name eth0
  ip -n "$net_s" addr add 10.234.0.1/24 dev eth0
  ip -n "$net_c" addr add 10.234.0.2/24 dev eth0
  for ns in "$net_c" "$net_s"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done

  ip netns exec "$net_s" "$bin" server "$net_addr" </dev/null >"$work/net-server.log" 2>&1 &
  net_server_pid=$!
  # shellcheck disable=SC2004,SC2034 # pids and live: the core's associative arrays
  pids[$net_server_pid]=1
  for ((i = 0; i < 100; i++)); do
    ! grep -qs '^listening' "$work/net-server.log" || break
    alive "$net_server_pid" || die "net: the netperf server ended: $(cat "$work/net-server.log")"
    sleep 0.1
  done
  grep -qs '^listening' "$work/net-server.log" || die "net: the netperf server did not start listening"

  printf 'round\tmode\tstatus\tmbit\trtt_median_us\trtt_p99_us\tclient_mean_us\terror\n' >"$out/net.tsv"
  log "net: 1 warm-up + $rounds rounds of ${net_modes[*]} (${net_seconds} s throughput, $net_count round trips each)"
  for ((r = 0; r <= rounds; r++)); do
    for ((i = 0; i < k; i++)); do
      net_run "$r" "${net_modes[(r + i) % k]}" "$b" "$bin"
    done
    printf '  round %d/%d done\n' "$r" "$rounds" >&2
  done
  net_cleanup
}

# net_run ROUND MODE BUNDLE BIN: one client run, a row of net.tsv. MODE is
# native, a runtime, or krun-oci/BACKEND (the bundle BUNDLE-BACKEND).
net_run() {
  local round=$1 mode=$2 b=$3 bin=$4 rt=${2%%/*} id="net-$$-$1-${2//\//-}" root argv pid rc=0 res mbit med p99 mean error=""
  root=$work/state/$rt
  [[ $mode != */* ]] || b=$b-${mode#*/}
  if [ "$mode" = native ]; then
    argv=(ip netns exec "$net_c" sh -c "$(net_client "$bin")")
  else
    mkdir -p "$root"
    rt_run_argv "$rt" "$root" "$b" "$id"
    # shellcheck disable=SC2004,SC2034 # pids and live: the core's associative arrays
    live[$id]="$rt $root"
  fi
  # timeout: a wedged run fails, it does not hang the bench.
  timeout -k 10 $((net_seconds + net_count / 20 + 120)) "${argv[@]}" \
    </dev/null >"$work/io/$id.out" 2>"$work/io/$id.err" &
  pid=$!
  # shellcheck disable=SC2004,SC2034 # pids and live: the core's associative arrays
  pids[$pid]=1
  wait "$pid" || rc=$?
  unset "pids[$pid]"
  if [ "$mode" != native ]; then
    [ "$rc" -eq 0 ] || rt_delete "$rt" "$root" "$id"
    unset "live[$id]"
  fi
  [ "$rt" != krun-oci ] || cp "$(rt_log "$id")" "$out/logs/$id.json" 2>/dev/null || true
  res=$(cat "$work/io/$id.out")
  mbit=$(sed -n 's/^throughput_mbit=\([0-9.]*\).*/\1/p' <<<"$res")
  med=$(sed -n 's/^latency_us_median=\([0-9.]*\).*/\1/p' <<<"$res")
  p99=$(sed -n 's/^latency_us_median=.* p99=\([0-9.]*\).*/\1/p' <<<"$res")
  mean=$(sed -n 's/^latency_us_median=.* client_mean_us=\([0-9.]*\).*/\1/p' <<<"$res")
  if [ "$rc" -ne 0 ] || [ -z "$mbit" ] || [ -z "$med" ] || [ -z "$p99" ]; then
    error="exit $rc: $(grep -v '^[[:space:]]*$' "$work/io/$id.err" | tail -n 1 | tr '\t' ' ' | cut -c1-160)"
    printf '  %s run %s failed: %s\n' "$mode" "$round" "$error" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$([ -z "$error" ] && echo ok || echo failed)" \
    "${mbit:-NA}" "${med:-NA}" "${p99:-NA}" "${mean:-NA}" "$error" >>"$out/net.tsv"
}

# net_values MODE COLUMN: COLUMN of MODE's successful timed runs.
net_values() {
  awk -F'\t' -v m="$1" -v c="$2" 'NR > 1 && $1 > 0 && $2 == m && $3 == "ok" && $c ~ /^[0-9.]+$/ { print $c }' "$out/net.tsv"
}

report_net() {
  local col name mode n med min max base ratio failed note
  echo "Network through the container's network namespace: a veth pair to a server namespace"
  echo "(netperf server); the netperf client in a busybox container in the other namespace"
  echo "(krun-oci: tap + tc redirect into the VM; runc: the namespace itself) or native there"
  echo "(ip netns exec). TCP throughput container -> server for $net_seconds s; TCP round trip of"
  echo "1 byte, $net_count per run (median and p99 of each run, then the median over runs). Both"
  echo "timed by the server, on the host's clock."
  echo "$rounds rounds after 1 warm-up, interleaved."
  echo
  printf '  %-26s %-16s %10s %21s %8s %5s\n' measure mode median min-max "x runc" runs
  for col in "4:TCP throughput, Mbit/s" "5:TCP round trip median, us" "6:TCP round trip p99, us"; do
    name=${col#*:}
    read -r _ base _ _ < <(net_values runc "${col%%:*}" | stats)
    for mode in "${net_modes[@]}"; do
      read -r n med min max < <(net_values "$mode" "${col%%:*}" | stats)
      failed=$(awk -F'\t' -v m="$mode" 'NR > 1 && $1 > 0 && $2 == m && $3 == "failed"' "$out/net.tsv" | wc -l)
      note=""
      [ "$failed" -eq 0 ] || note="  ($failed failed)"
      if [ "$n" -eq 0 ]; then
        printf '  %-26s %-16s FAILED: %s\n' "$name" "$mode" \
          "$(awk -F'\t' -v m="$mode" '$2 == m && $3 == "failed" { e = $8 } END { print e }' "$out/net.tsv")"
      else
        ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2fx", a / b; else print "n/a" }')
        printf '  %-26s %-16s %10s %21s %8s %5s%s\n' "$name" "$mode" "$med" "$min-$max" "$ratio" "$n" "$note"
      fi
      name=""
    done
  done
  echo
  # The backend and accelerator krun-oci chose, from its logs.
  jq -Rrs 'split("\n") | map(fromjson? // empty) | map(select(.msg == "hypervisor chosen"))
           | unique_by(.backend) | .[] | "  krun-oci: \(.backend) with \(.accel) (\(.reason))"' \
    "$out"/logs/net-*-krun-oci*.json 2>/dev/null || true
  echo "  Under TCG (krun-oci's, or the nested test host's) guest CPUs are emulated: the numbers"
  echo "  then measure the emulator as much as the tap + tc redirect path."
}

plot_net() {
  local mode x=0 n med min max
  printf 'x\tlabel\tmedian\tmin\tmax\n' >"$out/plot-net.dat"
  printf 'x\tlabel\tmedian\tmin\tmax\n' >"$out/plot-net-rtt.dat"
  for mode in "${net_modes[@]}"; do
    x=$((x + 1))
    read -r n med min max < <(net_values "$mode" 4 | stats)
    [ "$n" -eq 0 ] || printf '%s\t%s\t%s\t%s\t%s\n' "$x" "$mode" "$med" "$min" "$max" >>"$out/plot-net.dat"
    read -r n med min max < <(net_values "$mode" 5 | stats)
    [ "$n" -eq 0 ] || printf '%s\t%s\t%s\t%s\t%s\n' "$x" "$mode" "$med" "$min" "$max" >>"$out/plot-net-rtt.dat"
  done
  bar_plot net "TCP throughput, container -> server namespace ($rounds rounds)" "Mbit/s"
  bar_plot net-rtt "TCP 1-byte round trip, median per run ($rounds rounds)" "microseconds"
}
