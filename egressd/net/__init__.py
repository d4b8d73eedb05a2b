"""Thin, typed wrappers over kernel network devices (TUN) used by the agent and the proxy."""
