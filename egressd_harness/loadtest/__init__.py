"""Fairness under abuse, measured: `egressd loadtest` (issue 4, part 5).

The locust user classes live in `loadtests/locustfile.py`; this package runs
them on a fleet and judges the result:

- `scenarios`: the scenarios, their jobs, limits and phases (pure);
- `results`: parsing locust's CSV files, the proxies' metrics and logs (pure);
- `verdicts`: each verdict, the table and the JSON document (pure);
- `assess`: from what a run observed to its verdicts (pure);
- `runner`: the fleet, the load-generator namespaces, locust, the scrapes (I/O);
- `cli`: `egressd loadtest SCENARIO --duration S ...`.
"""
