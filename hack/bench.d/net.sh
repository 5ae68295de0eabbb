# shellcheck shell=bash disable=SC2154 # sourced by hack/bench, which sets here, out, work, rounds...
# net            network throughput and latency through the container's
#                network namespace (issue #6): two namespaces joined by a
#                veth pair (made and removed by the bench); a busybox server
#                in one; the client in a container in the other, under
#                krun-oci (the namespace carried into the VM by tap + tc
#                redirect) and runc, and natively in the namespace:
#                - TCP throughput: the client downloads 256 MiB from busybox
#                  httpd (`wget -O /dev/null`), timed in the client by
#                  /proc/uptime (10 ms resolution);
#                - ICMP round trip: `ping -c 20 -i 0.2`, the average.
#                Interleaved, 1 warm-up, then -n rounds. Writes net.tsv and
#                bench-net.png to DIR.

all_scenarios+=(net)

net_modes=(krun-oci runc native)
net_c="krun-bench-$$-c"
net_s="krun-bench-$$-s"

net_cleanup() {
  ip netns pids "$net_s" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$net_c" 2>/dev/null || true
  ip netns del "$net_s" 2>/dev/null || true
}

# The client: prints "mbit=N" and "rtt_ms=N".
net_client_script='
t0=$(cut -d" " -f1 /proc/uptime)
ok=0; wget -q -O /dev/null http://10.234.0.1:8080/big && ok=1
t1=$(cut -d" " -f1 /proc/uptime)
[ "$ok" = 1 ] && echo "mbit=$(awk -v a="$t0" -v b="$t1" "BEGIN { d = b - a; if (d <= 0) d = 0.01; printf \"%.1f\", 256 * 8 * 1.048576 / d }")"
ping -c 20 -i 0.2 -W 5 10.234.0.1 | sed -n "s|.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*|rtt_ms=\1|p"
'

scenario_net() {
  local r i k=${#net_modes[@]} mode b=$bundles/net root=$work/net-state res
  cleanup_hooks+=(net_cleanup)
  ip netns add "$net_c"
  ip netns add "$net_s"
  ip link add "kb$$c" type veth peer name "kb$$s"
  ip link set "kb$$c" netns "$net_c"
  ip link set "kb$$s" netns "$net_s"
  ip -n "$net_c" link set "kb$$c" name eth0
  ip -n "$net_s" link set "kb$$s" name eth0
  ip -n "$net_s" addr add 10.234.0.1/24 dev eth0
  ip -n "$net_c" addr add 10.234.0.2/24 dev eth0
  for ns in "$net_c" "$net_s"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
  # The server: busybox httpd with a 256 MiB file (in the page cache).
  mkdir -p "$work/net-www"
  dd if=/dev/zero of="$work/net-www/big" bs=1M count=256 status=none
  ip netns exec "$net_s" busybox httpd -f -p 10.234.0.1:8080 -h "$work/net-www" >/dev/null 2>&1 &
  "$here/mkbundle" "$b" sh -c "$net_client_script"
  # The container joins the namespace; it may ping.
  jq --arg ns "/run/netns/$net_c" '
      .linux.namespaces = [.linux.namespaces[] | select(.type != "network")] + [{type: "network", path: $ns}]
      | .process.capabilities |= with_entries(.value += ["CAP_NET_RAW"])' \
    "$b/config.json" >"$b/config.json.new" && mv "$b/config.json.new" "$b/config.json"
  mkdir -p "$root"
  printf 'round\tmode\tmbit\trtt_ms\n' >"$out/net.tsv"
  log "net: 1 warm-up + $rounds rounds of ${net_modes[*]}"
  for ((r = 0; r <= rounds; r++)); do
    for ((i = 0; i < k; i++)); do
      mode=${net_modes[(r + i) % k]}
      case $mode in
        krun-oci) res=$(timeout 300 "$KRUN_OCI" --root "$root" run --bundle "$b" "net-$$-$r" 2>>"$work/net.log") || true ;;
        runc) res=$(timeout 300 runc --root "$root" run --bundle "$b" "net-$$-$r" 2>>"$work/net.log") || true ;;
        native) res=$(timeout 300 ip netns exec "$net_c" busybox sh -c "$net_client_script" 2>>"$work/net.log") || true ;;
      esac
      printf '%s\t%s\t%s\t%s\n' "$r" "$mode" \
        "$(sed -n 's/^mbit=//p' <<<"$res")" "$(sed -n 's/^rtt_ms=//p' <<<"$res")" >>"$out/net.tsv"
    done
    printf '  round %d/%d done\n' "$r" "$rounds" >&2
  done
  net_cleanup
}

net_values() {
  awk -F'\t' -v m="$1" -v c="$2" 'NR > 1 && $1 > 0 && $2 == m && $c ~ /^[0-9.]+$/ { print $c }' "$out/net.tsv"
}

report_net() {
  local col name mode n med min max base ratio
  echo "Network through the container's namespace: a veth pair to a server namespace; client in a"
  echo "container (krun-oci: tap + tc redirect into the VM; runc: the namespace itself) or native."
  echo "$rounds rounds after 1 warm-up, interleaved."
  echo
  printf '  %-30s %-9s %10s %19s %8s %5s\n' measure mode median min-max "x runc" runs
  for col in "3:TCP throughput (Mbit/s)" "4:ICMP round trip (ms)"; do
    name=${col#*:}
    read -r _ base _ _ < <(net_values runc "${col%%:*}" | stats)
    for mode in "${net_modes[@]}"; do
      read -r n med min max < <(net_values "$mode" "${col%%:*}" | stats)
      ratio=$(awk -v a="$med" -v b="$base" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.2fx", a / b; else print "n/a" }')
      printf '  %-30s %-9s %10s %19s %8s %5s\n' "$name" "$mode" "$med" "$min-$max" "$ratio" "$n"
      name=""
    done
  done
  echo
  echo "  Under TCG (this host) the guest's CPU is emulated: throughput measures the emulator."
}

plot_net() {
  local mode x=0 n med min max
  printf 'x\tlabel\tmedian\tmin\tmax\n' >"$out/plot-net.dat"
  for mode in "${net_modes[@]}"; do
    x=$((x + 1))
    read -r n med min max < <(net_values "$mode" 3 | stats)
    [ "$n" -eq 0 ] || printf '%s\t%s\t%s\t%s\t%s\n' "$x" "$mode" "$med" "$min" "$max" >>"$out/plot-net.dat"
  done
  bar_plot net "TCP throughput through the container's namespace ($rounds rounds)" "Mbit/s"
}
