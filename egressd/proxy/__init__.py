"""The egress proxy: GENEVE endpoint, TUN, transparent TCP proxy, DNS responder, tier 2."""
