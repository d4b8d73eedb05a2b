"""The compose deployment's container entry points (`deploy/compose.yaml`)."""
