#!/usr/bin/env bash
# cmxsafe local demo: a device host, a gateway host and a server host in network namespaces.
# The server host runs a mosquitto broker on its loopback and publishes it through cmx-agent; the
# device host reaches it with stock OpenSSH (`ssh -L`) and an unchanged MQTT client publishes to
# localhost. Every message crosses the gateway: device channel -> ID-sock [device identity
# address] -> Mir-sock [srv1 identity address]:1883 -> srv1's channel -> cmx-agent -> broker,
# which sees the device's identity address as the client's address.
#
# Usage: demo.sh DIR-WITH-BINARIES [MESSAGES]   (as root; `cargo xtask demo` runs it)
set -euo pipefail

BIN=${1:?usage: demo.sh DIR-WITH-cmx-gateway-AND-cmx-agent [MESSAGES]}
GATEWAY=$BIN/cmx-gateway
AGENT=$BIN/cmx-agent
MESSAGES=${2:-5}
NS=cmxdemo$$
DEV=$NS-dev GW=$NS-gw SRV=$NS-srv
WORK=$(mktemp -d /tmp/cmxsafe-demo.XXXXXX)
PIDS=()

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# On failure, show what each part said before the evidence is deleted.
show_logs() {
  local log
  for log in gateway.log server-agent.log device-agent.log mosquitto.log received; do
    [[ -s $WORK/$log ]] || continue
    echo "---- $log (last 60 lines)" >&2
    tail -n 60 "$WORK/$log" >&2
  done
}

cleanup() {
  local status=$?
  if ((status != 0)); then show_logs; fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$DEV" "$GW" "$SRV"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# Command prefixes that run in a host's network namespace. `nsenter --net` rather than
# `ip netns exec`: the latter remounts /sys, hiding the cgroup v2 hierarchy and bpffs the
# gateway's sockmap data plane needs. nsenter execs, so `"${IN_SRV[@]}" cmd &` leaves cmd's own
# pid in $! for cleanup to stop.
IN_DEV=(nsenter --net="/run/netns/$DEV") IN_GW=(nsenter --net="/run/netns/$GW")
IN_SRV=(nsenter --net="/run/netns/$SRV")

wait_for() { # wait_for DESCRIPTION COMMAND...: run COMMAND again until it succeeds, for 15 s
  local what=$1; shift
  for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $what" >&2
  return 1
}

say "hosts: device ($DEV), gateway ($GW), server ($SRV) as network namespaces"
for ns in "$DEV" "$GW" "$SRV"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$GW" link add d0 type veth peer name eth0 netns "$DEV"
ip -n "$GW" link add s0 type veth peer name eth0 netns "$SRV"
ip -n "$GW" addr add 10.1.0.1/24 dev d0 && ip -n "$GW" link set d0 up
ip -n "$GW" addr add 10.2.0.1/24 dev s0 && ip -n "$GW" link set s0 up
ip -n "$DEV" addr add 10.1.0.2/24 dev eth0 && ip -n "$DEV" link set eth0 up
ip -n "$SRV" addr add 10.2.0.2/24 dev eth0 && ip -n "$SRV" link set eth0 up

say "identities: server srv1, device a23ff868ec8f (its identity address comes from its MAC)"
ssh-keygen -q -t ed25519 -N '' -C srv1 -f "$WORK/srv1"
ssh-keygen -q -t ed25519 -N '' -C a23ff868ec8f -f "$WORK/dev"
cat > "$WORK/identities.toml" <<TOML
[[identity]]
name = "srv1"
role = "server"
keys = ["$(cat "$WORK/srv1.pub")"]
address = "fd63:6d78::1"
permit_listen = ["1883"]

[[identity]]
name = "a23ff868ec8f"
role = "device"
keys = ["$(cat "$WORK/dev.pub")"]
mac = "a2:3f:f8:68:ec:8f"
permit_open = ["srv1:1883"]
TOML
# Its own pin directory and cgroup: a gateway already running on this host keeps its own.
CGROUP2=$(findmnt -n -t cgroup2 -o TARGET | head -n 1 || true)
printf 'listen = "0.0.0.0:2222"\n[dataplane]\npin_dir = "/sys/fs/bpf/%s"\ncgroup = "%s"\n' \
  "$NS" "${CGROUP2:+$CGROUP2/$NS}" > "$WORK/gateway.toml"
"$GATEWAY" check-config "$WORK/gateway.toml"
DEV_ADDR=$("$GATEWAY" address a2:3f:f8:68:ec:8f)

say "gateway: cmx-gateway run on the gateway host"
# CI builds with CMX_EBPF=require: there the demo must run the kernel data plane, not fall back.
DATAPLANE=auto
[[ ${CMX_EBPF:-} == require ]] && DATAPLANE=sockmap
"${IN_GW[@]}" "$GATEWAY" --log-format json run --config "$WORK/gateway.toml" \
  --dataplane "$DATAPLANE" 2> "$WORK/gateway.log" &
PIDS+=($!)
wait_for "the gateway" grep -q 'cmx-gateway ready' "$WORK/gateway.log"
HOSTKEY=$(cat "$WORK/ssh_host_ed25519_key.pub")
printf '[10.1.0.1]:2222 %s\n[10.2.0.1]:2222 %s\n' "$HOSTKEY" "$HOSTKEY" > "$WORK/known_hosts"
grep -o '"dataplane":"[^"]*"' "$WORK/gateway.log" | head -n 1 | sed -E 's/.*:"(.*)"/    data plane: \1/'
echo "    host key $(ssh-keygen -lf "$WORK/ssh_host_ed25519_key.pub" | cut -d' ' -f2) (pinned by both agents)"

SSH=(ssh -N -p 2222 -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes
     -o "UserKnownHostsFile=$WORK/known_hosts" -o ExitOnForwardFailure=yes -o ServerAliveInterval=10)

say "server host: mosquitto on [::1]:1883, published to the gateway by cmx-agent"
printf 'listener 1883 ::1\nallow_anonymous true\nlog_dest stderr\nlog_type all\n' > "$WORK/mosquitto.conf"
"${IN_SRV[@]}" mosquitto -c "$WORK/mosquitto.conf" 2> "$WORK/mosquitto.log" &
PIDS+=($!)
wait_for "mosquitto" "${IN_SRV[@]}" mosquitto_sub -h ::1 -p 1883 -t probe -W 1 -C 1 -E
"${IN_SRV[@]}" mosquitto_sub -h ::1 -p 1883 -t 'sensors/#' -v > "$WORK/received" &
PIDS+=($!)
cat > "$WORK/server-agent.toml" <<TOML
identity = "srv1"
key = "srv1"
gateways = ["10.2.0.1:2222"]
known_hosts = "known_hosts"
status_file = "server-agent.status.json"

[[publish]]
name = "broker"
port = 1883
to = "[::1]:1883"
preserve_source = true   # the broker sees who is really connecting
TOML
"${IN_SRV[@]}" "$AGENT" run --config "$WORK/server-agent.toml" 2> "$WORK/server-agent.log" &
PIDS+=($!)
wait_for "srv1's forward" grep -q '"request":"tcpip-forward :1883"' "$WORK/gateway.log"
wait_for "srv1's agent status" "${IN_SRV[@]}" "$AGENT" status --config "$WORK/server-agent.toml"
"${IN_SRV[@]}" "$AGENT" status --config "$WORK/server-agent.toml" | sed 's/^/    /'

say "device host: ssh -L 127.0.0.1:1883:srv1:1883 (the MQTT app keeps talking to localhost)"
"${IN_DEV[@]}" "${SSH[@]}" -i "$WORK/dev" -L 127.0.0.1:1883:srv1:1883 -L 127.0.0.1:8883:srv1:8883 \
  a23ff868ec8f@10.1.0.1 2> "$WORK/device-agent.log" &
PIDS+=($!)
wait_for "the device's local port" "${IN_DEV[@]}" bash -c 'exec 3<>/dev/tcp/127.0.0.1/1883'

# A function, so that wait_for counts the lines anew on every try.
received_at_least() { (($(wc -l < "$WORK/received") >= $1)); }

say "publishing $MESSAGES messages from the device host to localhost:1883"
for i in $(seq "$MESSAGES"); do
  "${IN_DEV[@]}" mosquitto_pub -h 127.0.0.1 -p 1883 -i "dev-$i" -t sensors/a23ff868ec8f/temperature -m "$((200 + i))e-1 C"
  wait_for "message $i" received_at_least "$i"
  seen=$(grep -o "New connection from [^ ]* on port 1883" "$WORK/mosquitto.log" | tail -n 1 | cut -d' ' -f4)
  addr=${seen%:*}
  printf '    broker received: %-45s from %s\n' "$(sed -n "${i}p" "$WORK/received")" "$seen"
  [[ $addr == "$DEV_ADDR" ]] || { echo "demo: the broker saw $addr, not the device identity $DEV_ADDR" >&2; exit 1; }
done
echo "    (the broker's client address is the identity address of device a23ff868ec8f: $DEV_ADDR)"

say "outside its security context: the device tries srv1:8883"
"${IN_DEV[@]}" mosquitto_pub -h 127.0.0.1 -p 8883 -t sensors/x -m denied 2>/dev/null || true
wait_for "the refusal" grep -q '"request":"direct-tcpip srv1:8883"' "$WORK/gateway.log"
grep '"request":"direct-tcpip srv1:8883"' "$WORK/gateway.log" | head -n 1 |
  sed -E 's/.*"reason":"([^"]*)".*/    gateway refused: \1/'

say "audit trail (the gateway's decisions, one line each)"
# A JSON field of a log line: a string, or a number/boolean; empty when absent.
jfield() { { grep -o "\"$1\":\"[^\"]*\"" <<< "$2" || true; } | head -n 1 | cut -d'"' -f4; }
jvalue() { { grep -o "\"$1\":[^,}\"]*" <<< "$2" || true; } | head -n 1 | cut -d: -f2; }
closed() { # what a closed path carried, and whether the kernel spliced it
  local to back how="relayed in user space"
  to=$(jvalue bytes_to_target "$1") back=$(jvalue bytes_from_target "$1")
  [[ $(jvalue spliced "$1") == true ]] && how="sockmap: $(jvalue spliced_to_target "$1") B spliced"
  [[ $to$back == 00 ]] && how="no data: the demo's readiness probe"
  echo "$to B to srv1, $back B back ($how)"
}
grep '"target":"audit"' "$WORK/gateway.log" | while IFS= read -r line; do
  event=$(jfield event "$line") what="$(jfield request "$line")$(jfield destination "$line")"
  [[ $event == pair-closed ]] && what=$(closed "$line")
  printf '    %-12s %-7s %-14s %s\n' "$event" "$(jfield decision "$line")" \
    "$(jfield identity "$line")" "$what"
done
say "done: $MESSAGES messages crossed the gateway; cleaning up"
