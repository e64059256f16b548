#!/bin/sh
# server: Mosquitto on localhost:1883, published through the gateway by cmx-agent.
# device: cmx-agent only; its local tunnel makes the server's broker appear on localhost:1883.
set -eu
case "${1:-}" in
  server)
    mosquitto -p 1883 -d
    ;;
  device) ;;
  *)
    echo "usage: iot-entrypoint server|device" >&2
    exit 2
    ;;
esac
exec /usr/local/bin/cmx-agent --log-format json run --config /etc/cmx-agent/agent.toml
