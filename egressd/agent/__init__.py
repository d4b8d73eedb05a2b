"""The node agent: sandbox veths, tier-1 eBPF (`egressd.agent.tier1`), the TUN
`egr0`, GENEVE encapsulation towards the proxies, proxy selection and health."""
