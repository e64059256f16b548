#!/bin/sh
# server: Mosquitto on localhost:1883 (127.0.0.1 and ::1), published through the gateway by
#         cmx-agent; the broker logs every connection and message to stderr (unbuffered), so
#         `kubectl logs` / `docker logs` show which address each client came from.
# device: cmx-agent only; its local tunnel makes the server's broker appear on localhost:1883.
set -eu
case "${1:-}" in
  server)
    printf 'listener 1883 127.0.0.1\nlistener 1883 ::1\nallow_anonymous true\nlog_dest stderr\nlog_type all\nlog_timestamp false\n' \
      >/tmp/mosquitto.conf
    mosquitto -c /tmp/mosquitto.conf &
    ;;
  device) ;;
  *)
    echo "usage: iot-entrypoint server|device" >&2
    exit 2
    ;;
esac
exec /usr/local/bin/cmx-agent --log-format json run --config /etc/cmx-agent/agent.toml
