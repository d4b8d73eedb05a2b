"""`egressd bench`: the data-path benchmark (issue 3, item 8).

Three paths over one topology and one HTTP server (the fleet's "internet",
`api.allowed.test` = 203.0.113.10:80), measured in one run:

- ``kernel``: a client namespace bridged straight onto ``br-inet``, kernel
  routing only (the physical limit of this machine);
- ``squid``: Debian's Squid as a transparent intercepting proxy
  (nftables ``redirect`` to ``http_port 3129 intercept``);
- ``egressd``: a sandbox registered with node1's agent: tier 1, the agent's
  GENEVE tunnel, the proxy's tier 2 and relay;
- ``egressd-gvisor`` (issue 10): the egressd path with the client inside a
  runsc sandbox, gVisor's netstack included (`gvisor`);
- the interception rows (issue 12), HTTPS on :443 to the same server:
  ``squid-bump`` (a second Squid, ``https_port ... intercept ssl-bump``,
  ``ssl_bump bump``) and ``egressd-intercept`` (a second sandbox whose job
  has ``tls: intercept``), compared with each other.

Modules: `paths` sets the paths up and tears them down, `load` drives the
load generators (wrk, curl, an idle-connection holder), `report` parses their
output and renders the table and the JSON (pure), `cpu` reads the CPU time of
the paths' processes from /proc, `ratios` judges issue 10's goals (pure),
`cli` wires them together.
"""
