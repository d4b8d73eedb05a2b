"""egressd: policy-controlled egress for sandboxed code."""

__version__ = "0.1.0"
