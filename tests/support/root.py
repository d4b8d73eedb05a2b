"""What a `root` test needs: root itself, then the tools and devices named on its marker.

`pytest.mark.root` alone needs root; `pytest.mark.root("nft", "/dev/net/tun")` also needs
each tool on PATH (or in /usr/sbin, which a non-login root shell may not have on PATH) and
each absolute path to exist. tests/conftest.py skips a test whose needs are unmet.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

# The namespaced proxy worlds (ip netns, nft rules, nsenter into them).
NETNS_TOOLS = ("ip", "nft", "nsenter")
# The agent: tier 1 is compiled and loaded (clang, bpftool) and sandboxes reach it by a TUN.
AGENT_NEEDS = ("ip", "nsenter", "clang", "bpftool", "/dev/net/tun")


def unmet(needs: Iterable[str]) -> str | None:
    """Why a root test cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for need in needs:
        if need.startswith("/"):
            if not Path(need).exists():
                return f"needs {need}"
        elif shutil.which(need) is None and not Path("/usr/sbin", need).exists():
            return f"needs {need}"
    return None
