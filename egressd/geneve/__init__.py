"""GENEVE (RFC 8926) codec with egressd's job-identity option."""
