"""The fleet demo: one core (`core`: the two jobs as data, judging each attempt from the
proxies' audit events and the node's tier-1 counters, the report) and two backends, where the
fleet runs: `netns` (the local topology, `egressd demo`) and `compose` (the compose fleet's
`demo` service, `python -m egressd_harness.deploy demo`). `offline`: `egressd demo --offline`,
the in-process checks; `cli`: the verb."""
