"""What ``ss -ti`` says about a server's TCP connections (iproute2)."""
from __future__ import annotations

import subprocess


def congestion_controls(port: int, netns: str | None = None) -> list[str]:
    """The congestion control of each established connection whose local port is ``port``
    (in network namespace ``netns``, if given), in ss's order."""
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        known = set(f.read().split())
    argv = ["ss", "-tinH", "state", "established", "( sport = :%d )" % port]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns] + argv
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout
    # one line of addresses and one of details per connection; the name is in the details
    return [names[0] for names in ([t for t in line.split() if t in known]
                                   for line in out.splitlines()) if names]
