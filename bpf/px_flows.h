// SPDX-License-Identifier: Apache-2.0
/*
 * px_flows: the proxy's flow map (inner 5-tuple -> job option and node), one
 * definition for the two programs that use it:
 *
 *   bpf/proxy.c      px_ingress records a flow on its first packet (and the
 *                    slow path's userspace writes it); px_egress reads the job
 *                    option of return traffic from it;
 *   bpf/reuseport.c  picks the worker of a new connection by the job it finds.
 *
 * reuseport.c's object does not create its own copy: its loader hands libbpf
 * the map proxy.c's loader pinned (bpftool "map name px_flows pinned PATH").
 * libbpf adopts that map whatever its shape (bpf_map__reuse_fd does not compare
 * it with this declaration; the verifier only checks the program's accesses),
 * so the loader checks the shape and the map id itself
 * (egressd.proxy.reuseport). Declaring the map here, once, keeps the two
 * programs in step by construction. The Python mirror is
 * egressd/proxy/kernel_maps.py (pack_flow_key, pack_flow; checked by
 * tests/unit/proxy/test_kernel_maps.py).
 *
 * Include after <linux/bpf.h> and <bpf/bpf_helpers.h>.
 */
#ifndef EGRESSD_PX_FLOWS_H
#define EGRESSD_PX_FLOWS_H

/* The sandbox -> internet direction, as the datagram carried it (network byte
 * order, as read from the inner headers: after decapsulation and TPROXY the
 * transparent listener sees these same headers). */
struct px_flow_key {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct px_flow {
	__u8 job_id[16];
	__u8 digest[8];
	__be32 node;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct px_flow_key);
	__type(value, struct px_flow);
} px_flows SEC(".maps");

#endif /* EGRESSD_PX_FLOWS_H */
