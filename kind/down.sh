#!/usr/bin/env bash
# Removes what kind/up.sh made: the two IoT containers, the kind cluster, the generated keys.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
docker rm -f cmxsafe-iot-server cmxsafe-iot-device >/dev/null 2>&1 || true
if kind get clusters 2>/dev/null | grep -qx cmxsafe; then
  kind delete cluster --name cmxsafe
fi
rm -rf "$here/.work"
echo "kind/down.sh: removed the cmxsafe cluster, the IoT containers and kind/.work"
