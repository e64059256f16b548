#!/usr/bin/env bash
# The whole cmxsafe system on kind: a 3-node cluster with MetalLB, a DNS server for the demo
# domain fed by ExternalDNS, the gateway DaemonSet with its controller, and two containers
# outside the cluster (an IoT server with a Mosquitto broker and an IoT device), each with
# cmx-agent. The device publishes MQTT to localhost:1883; the messages reach the server's broker
# through dynamic-service-srv1.iot.cmxsafe.test, the replica holding srv1's session.
#
#   kind/up.sh      # build, deploy, run the demo (re-runnable)
#   kind/down.sh    # remove everything
#
# Needs: docker, kind, kubectl, ssh-keygen, openssl; see kind/README.md for the versions.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
work="$here/.work"
cluster=cmxsafe
domain=iot.cmxsafe.test
metallb_version=v0.15.2
kctl=(kubectl --context "kind-$cluster")

say() { printf '\n== %s\n' "$*"; }
die() { printf 'kind/up.sh: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl ssh-keygen openssl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see kind/README.md)"
done
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running? are you in the docker group?)"
mkdir -p "$work"

say "cluster"
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --config "$here/cluster.yaml"
fi

say "images (gateway, agent, IoT hosts)"
docker build -f "$root/deploy/gateway/Dockerfile" -t cmxsafe/cmx-gateway:kind "$root"
docker build -f "$root/deploy/agent/Dockerfile" -t cmxsafe/cmx-agent:kind "$root"
docker build -f "$here/iot/Dockerfile" -t cmxsafe/iot-host:kind "$here/iot"
kind load docker-image --name "$cluster" cmxsafe/cmx-gateway:kind

say "MetalLB $metallb_version"
"${kctl[@]}" apply -f "https://raw.githubusercontent.com/metallb/metallb/$metallb_version/config/manifests/metallb-native.yaml"
"${kctl[@]}" -n metallb-system rollout status deployment/controller --timeout=180s
"${kctl[@]}" -n metallb-system rollout status daemonset/speaker --timeout=180s

# MetalLB hands out the top of kind's Docker network; the first address is the DNS server's.
subnet="$(docker network inspect kind --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}' | tr ' ' '\n' | grep -m1 '\.')"
[[ "$subnet" =~ ^([0-9]+)\.([0-9]+)\.0\.0/16$ ]] || die "kind's network is $subnet; this script expects an IPv4 /16"
net="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
dns_ip="$net.255.200"

say "keys (host key shared by every replica, agent keys, TSIG key)"
[[ -f "$work/ssh_host_ed25519_key" ]] || ssh-keygen -q -t ed25519 -N '' -C cmxsafe-gw -f "$work/ssh_host_ed25519_key"
for id in srv1 dev1; do
  mkdir -p "$work/$id"
  [[ -f "$work/$id/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C "$id" -f "$work/$id/id_ed25519"
done
[[ -f "$work/tsig.secret" ]] || openssl rand -base64 32 >"$work/tsig.secret"
tsig="$(cat "$work/tsig.secret")"
printf 'key "externaldns" {\n  algorithm hmac-sha256;\n  secret "%s";\n};\n' "$tsig" >"$work/tsig.conf"
fingerprint="$(ssh-keygen -lf "$work/ssh_host_ed25519_key.pub" | cut -d' ' -f2)"

say "secrets and the identity registry"
for ns in cmxsafe cmxsafe-dns external-dns; do
  "${kctl[@]}" create namespace "$ns" --dry-run=client -o yaml | "${kctl[@]}" apply -f -
done
"${kctl[@]}" -n cmxsafe create secret generic cmxsafe-gateway-host-key \
  --from-file="$work/ssh_host_ed25519_key" --from-file="$work/ssh_host_ed25519_key.pub" \
  --dry-run=client -o yaml | "${kctl[@]}" apply -f -
for ns in cmxsafe-dns external-dns; do
  "${kctl[@]}" -n "$ns" create secret generic dns-tsig \
    --from-file=tsig.conf="$work/tsig.conf" --from-literal=secret="$tsig" \
    --dry-run=client -o yaml | "${kctl[@]}" apply -f -
done
cat >"$work/identities.toml" <<TOML
# Written by kind/up.sh.
[[identity]]
name = "srv1"
role = "server"
keys = ["$(cat "$work/srv1/id_ed25519.pub")"]
address = "fd63:6d78::1"
permit_listen = ["localhost:1883"]

[[identity]]
name = "dev1"
role = "device"
keys = ["$(cat "$work/dev1/id_ed25519.pub")"]
mac = "a2:3f:f8:68:ec:8f"
permit_open = ["srv1:1883"]
TOML

say "gateway, DNS server, ExternalDNS"
"${kctl[@]}" kustomize "$here/manifests" \
  | sed -e "s/172\.18\.255\./$net.255./g" \
  | "${kctl[@]}" apply -f -
# After the kustomization (which carries an empty registry): the demo's identities.
"${kctl[@]}" -n cmxsafe create configmap cmxsafe-registry --from-file="$work/identities.toml" \
  --dry-run=client -o yaml | "${kctl[@]}" apply -f -
"${kctl[@]}" -n cmxsafe rollout status daemonset/cmxsafe-gateway --timeout=300s
"${kctl[@]}" -n cmxsafe-dns rollout status deployment/bind --timeout=180s
"${kctl[@]}" -n external-dns rollout status deployment/external-dns --timeout=180s
"${kctl[@]}" -n cmxsafe logs daemonset/cmxsafe-gateway --tail=20 | grep -m1 'data plane' || true

agent_config() { # identity, gateway host, tunnel table
  cat <<TOML
identity = "$1"
key = "id_ed25519"
gateways = ["$2:22"]
host_key_fingerprints = ["$fingerprint"]
$3
TOML
}
agent_config srv1 "gw.$domain" '
[[publish]]
name = "broker"
port = 1883
to = "127.0.0.1:1883"' >"$work/srv1/agent.toml"
agent_config dev1 "dynamic-service-srv1.$domain" '
[[local]]
name = "mqtt"
listen = "127.0.0.1:1883"
target = "srv1:1883"' >"$work/dev1/agent.toml"
chmod -R a+rX "$work/srv1" "$work/dev1"

run_host() { # name, role, identity
  docker rm -f "$1" >/dev/null 2>&1 || true
  docker run -d --name "$1" --network kind --dns "$dns_ip" \
    -v "$work/$3:/etc/cmx-agent:ro" cmxsafe/iot-host:kind "$2" >/dev/null
}

wait_for() { # description, command...
  local what="$1"; shift
  for _ in $(seq 1 90); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 2
  done
  die "timed out waiting for $what"
}

say "IoT server (outside the cluster): Mosquitto + cmx-agent publishing port 1883 as srv1"
wait_for "gw.$domain in DNS" docker run --rm --network kind --entrypoint sh cmxsafe/iot-host:kind \
  -c "dig +short @$dns_ip gw.$domain | grep -q ."
run_host cmxsafe-iot-server server srv1
wait_for "dynamic-service-srv1 to get an address" \
  sh -c "${kctl[*]} -n cmxsafe get service dynamic-service-srv1 -o jsonpath='{.status.loadBalancer.ingress[0].ip}' | grep -q ."
"${kctl[@]}" -n cmxsafe get service dynamic-service-srv1 -o wide
"${kctl[@]}" -n cmxsafe get endpointslice dynamic-service-srv1 -o wide

say "IoT device (outside the cluster): cmx-agent, MQTT to localhost:1883"
wait_for "dynamic-service-srv1.$domain in DNS" docker exec cmxsafe-iot-server \
  sh -c "dig +short dynamic-service-srv1.$domain | grep -q ."
run_host cmxsafe-iot-device device dev1
wait_for "the device's tunnel" docker exec cmxsafe-iot-device cmx-agent status --config /etc/cmx-agent/agent.toml

say "MQTT: the device publishes, the server's broker receives"
docker exec cmxsafe-iot-server mosquitto_sub -h 127.0.0.1 -t 'sensors/#' -v -C 5 -W 60 >"$work/received.txt" &
sub=$!
sleep 1
for i in 1 2 3 4 5; do
  docker exec cmxsafe-iot-device mosquitto_pub -h 127.0.0.1 -t sensors/dev1/temperature -m "21.$i"
done
wait "$sub" || die "the server's broker did not receive the messages"
cat "$work/received.txt"
[[ "$(wc -l <"$work/received.txt")" -eq 5 ]] || die "expected 5 messages"
say "ok: 5 messages from dev1 reached srv1's broker via dynamic-service-srv1.$domain"
echo "Gateway logs: ${kctl[*]} -n cmxsafe logs daemonset/cmxsafe-gateway"
echo "Tear down:    kind/down.sh"
