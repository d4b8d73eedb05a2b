"""Kernel networking at the I/O edge: namespaces, links and routes
(`egressd.net.netns`) and TUN devices (`egressd.net.tun`)."""
