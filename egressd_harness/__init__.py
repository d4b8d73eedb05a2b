"""The harness around the egressd daemons: what tests, benchmarks and demonstrations need and a
deployment does not.

`topology` (the local fleet in network namespaces and its test internet), `bench`, `loadtest`,
`deploy` (the compose and Kubernetes test fleet's container roles), `demo` (one demo core, a
namespaces and a compose backend). It imports
`egressd`; `egressd` imports it only from a subcommand that runs it (`egressd/cli.py`'s
`COMMANDS`), never at module level (tests/unit/test_import_graph.py).
"""
