"""The sandbox unit: gVisor (runsc) launch of untrusted code.

- `bundle`: pure; the OCI runtime config of one sandbox, as a dict.
- `rootfs`: writes a bundle to disk (the narrowed root directory, its generated
  /etc, the mount points and config.json) and removes it again.
- `runsc`: the I/O edge; launches runsc, relays the command's output, returns
  its exit code and always cleans up.

Every failure the unit raises on purpose is a `SandboxError`.
"""

from __future__ import annotations

from egressd.errors import EgressdError


class SandboxError(EgressdError):
    """A sandbox that cannot be prepared, launched or cleaned up.

    Reasons: bad_mount, mount_unreadable, bad_sandbox_id, bad_bundle,
    bad_policy_file, no_node, ca_invalid, netns_missing, runsc_missing,
    runsc_failed, sandbox_exists, launch_failed, command_not_found,
    command_not_executable, timeout, cleanup_failed.
    """


__all__ = ["SandboxError"]
