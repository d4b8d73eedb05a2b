"""What test modules share: waits, namespace helpers, metrics readers.

Test modules import from here, never from each other (a test module imported as a
library runs its `pytestmark` and fixtures in the importer's namespace). Metrics text
is read with `egressd.metrics_text`, the daemons' own parser, not a copy.
"""
