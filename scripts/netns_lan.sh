# Sourced by the benchmarks that run processes on a shaped LAN of Linux network namespaces.
#
#   lan_up NAME COUNT RATE_MBIT   namespaces NAME-0 .. NAME-(COUNT-1) at 10.231.0.1 .. COUNT,
#                                 each joined by a veth pair to a bridge in namespace NAME-sw
#                                 (itself at 10.231.0.254), every link shaped to RATE_MBIT in
#                                 both directions with `tc qdisc ... tbf`
#   lan_down NAME COUNT           removes them (and nothing else)
#
# Needs root (ip netns, tc), and the 10.231.0.0/24 addresses free inside the namespaces.

lan_check() { # script-name
  if [[ $(id -u) != 0 ]]; then
    echo "$1: needs root for ip netns and tc (run it with sudo)" >&2
    exit 1
  fi
  for tool in ip tc; do
    command -v "$tool" > /dev/null || { echo "$1: '$tool' not found (install iproute2)" >&2; exit 1; }
  done
}

lan_down() { # name count
  local i
  for ((i = 0; i < $2; i++)); do ip netns del "$1-$i" 2> /dev/null || true; done
  ip netns del "$1-sw" 2> /dev/null || true
}

# tbf: the bucket holds ~2 ms at the rate, the queue ~20 ms (a switch port's buffer).
lan_shape() { # netns dev rate_mbit
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "${3}mbit" \
    burst $(($3 * 1000 / 8 * 2))b latency 20ms
}

lan_up() { # name count rate_mbit
  local name=$1 count=$2 rate=$3 sw=$1-sw i ns
  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" addr add 10.231.0.254/24 dev br0
  ip -n "$sw" link set br0 up
  for ((i = 0; i < count; i++)); do
    ns=$name-$i
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add eth0 type veth peer name "${name:0:8}${i}b" netns "$sw"
    ip -n "$ns" addr add "10.231.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$sw" link set "${name:0:8}${i}b" master br0
    ip -n "$sw" link set "${name:0:8}${i}b" up
    lan_shape "$ns" eth0 "$rate"               # what the member uploads
    lan_shape "$sw" "${name:0:8}${i}b" "$rate" # what it downloads
  done
}
