"""The fleet's audit events: reading, filtering and printing them (`egressd audit`)."""
