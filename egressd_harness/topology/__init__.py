"""The local fleet in network namespaces (the embedded default topology)."""
