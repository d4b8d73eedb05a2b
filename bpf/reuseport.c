// SPDX-License-Identifier: Apache-2.0
/*
 * egressd proxy workers: which worker accepts a new connection
 * (issue 10 item 4; docs/decisions.md, "Proxy workers").
 *
 * rp_select: an SK_REUSEPORT program attached (SO_ATTACH_REUSEPORT_EBPF) to
 * the SO_REUSEPORT group of a transparent listener, one socket per worker
 * process: TCP (the interceptor, DNS over TCP) or UDP (DNS; UDP and TCP
 * ports are separate groups, each with its own instance of this program and
 * its own rp_workers). Both read the same 5-tuple at the same offsets (the
 * ports are the first 4 bytes of either header) and find UDP flows in
 * px_flows as px_ingress records them. The kernel runs it on every listener lookup of the
 * group: a SYN (and a syncookie's ACK), whether it came through nftables
 * TPROXY (nf_tproxy_get_sock_v4 looks the listener up with the packet) or by
 * plain delivery to 127.0.0.1:<port>. It:
 *
 *   1. reads the IPv4 and TCP headers with bpf_skb_load_bytes_relative(...,
 *      BPF_HDR_START_NET). Not ctx->data: that starts at the TCP header on
 *      tcp_v4_rcv's lookup but at the IPv4 header on TPROXY's (netfilter runs
 *      before the IP header is pulled); the network header offset is right in
 *      both;
 *   2. looks the 5-tuple up in px_flows (bpf/px_flows.h: the map bpf/proxy.c's
 *      px_ingress and the slow path fill before the packet reaches TPROXY; the
 *      loader hands this object the proxy's pinned map);
 *   3. worker = fnv1a32(job id) % rp_config.workers (egressd.proxy.reuseport
 *      .worker_for mirrors it) and bpf_sk_select_reuseport from rp_workers, the
 *      REUSEPORT_SOCKARRAY holding worker i's listening socket at index i.
 *
 * So every connection of a job lands on one worker, and that worker's per-job
 * limits (connections, new connections/s, ports, bandwidth) are exact.
 *
 * Fail closed: anything but a selected worker returns SK_DROP, counted by
 * reason in rp_stats. SK_DROP makes the lookup find no listener: nftables'
 * tproxy expression does not match (NFT_BREAK), the packet is neither marked
 * nor policy-routed to the host, and with ip_forward=0 it dies in the proxy's
 * routing (egressd.proxy.nft); a plain lookup answers the SYN with a RST.
 *
 *   unknown_flow    no px_flows entry. Every SYN that reaches the listener
 *                   should have one (px_ingress records it before decapsulating,
 *                   the slow path before writing to the TUN), so this is an LRU
 *                   eviction or a packet that did not come through GENEVE. The
 *                   interceptor would deny it (unknown_flow) anyway. Not spread
 *                   by the kernel's hash: a worker looking the flow up later
 *                   could find the entry (written after this lookup) and serve
 *                   the job on a worker that is not its own, splitting its
 *                   limits. Not picked by the inner source address either: a
 *                   job spans sandboxes and nodes, so that is not the job's
 *                   worker. A dropped SYN is retransmitted by the client, and by
 *                   then the flow is normally there.
 *   no_worker       the job's slot in rp_workers is empty (the supervisor holds
 *                   every listening socket, so only during start or stop).
 *                   Another worker would split the job's limits.
 *   malformed       not IPv4 TCP or UDP, or the headers cannot be read.
 *   not_configured  rp_config.workers is 0 (or above RP_MAX_WORKERS): not
 *                   loaded completely.
 *
 * BPF_PROG_TEST_RUN does not exist for SK_REUSEPORT; the tests use real
 * sockets (tests/integration/test_reuseport.py). The stat enum is mirrored in
 * egressd/proxy/reuseport.py and checked by a unit test.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "px_flows.h" /* px_flows, shared with bpf/proxy.c */

/* Keep in sync with egressd.proxy.reuseport.Stat (checked by a unit test). */
enum rp_stat {
	RP_UNKNOWN_FLOW = 0,
	RP_NO_WORKER = 1,
	RP_MALFORMED = 2,
	RP_NOT_CONFIGURED = 3,
	RP_DROP_COUNT = 4, /* the reasons above are drops; below, what passed */
	RP_SELECTED = 4,
	RP_STAT_COUNT = 5,
};

#define RP_MAX_WORKERS 256
#define RP_FNV_OFFSET 2166136261u
#define RP_FNV_PRIME 16777619u

struct rp_config {
	__u32 workers; /* listening sockets in rp_workers, at 0 .. workers - 1 */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_config);
} rp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, RP_MAX_WORKERS);
	__type(key, __u32);
	__type(value, __u64); /* an fd when written, the socket's cookie when read */
} rp_workers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RP_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} rp_stats SEC(".maps");

static __always_inline int count(__u32 stat, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&rp_stats, &stat);

	if (n)
		*n += 1;
	return verdict;
}

/* FNV-1a over the 16 bytes of the job id: cheap, unrolled, and one line of
 * Python (worker_for). Job ids are UUIDs, but not all of them random. */
static __always_inline __u32 job_hash(const __u8 *job_id)
{
	__u32 h = RP_FNV_OFFSET;

#pragma unroll
	for (int i = 0; i < 16; i++) {
		h ^= job_id[i];
		h *= RP_FNV_PRIME;
	}
	return h;
}

SEC("sk_reuseport")
int rp_select(struct sk_reuseport_md *ctx)
{
	__u32 zero = 0;
	struct rp_config *cfg = bpf_map_lookup_elem(&rp_config, &zero);

	if (!cfg || cfg->workers == 0 || cfg->workers > RP_MAX_WORKERS)
		return count(RP_NOT_CONFIGURED, SK_DROP);
	if (ctx->eth_protocol != bpf_htons(ETH_P_IP) ||
	    (ctx->ip_protocol != IPPROTO_TCP && ctx->ip_protocol != IPPROTO_UDP))
		return count(RP_MALFORMED, SK_DROP);

	struct iphdr ip;

	if (bpf_skb_load_bytes_relative(ctx, 0, &ip, sizeof(ip), BPF_HDR_START_NET) < 0)
		return count(RP_MALFORMED, SK_DROP);
	if (ip.version != 4 || ip.ihl < 5 || ip.protocol != ctx->ip_protocol)
		return count(RP_MALFORMED, SK_DROP);

	__be16 ports[2];

	if (bpf_skb_load_bytes_relative(ctx, ip.ihl * 4, ports, sizeof(ports),
					BPF_HDR_START_NET) < 0)
		return count(RP_MALFORMED, SK_DROP);

	struct px_flow_key fk = {
		.src = ip.saddr,
		.dst = ip.daddr,
		.sport = ports[0],
		.dport = ports[1],
		.proto = ip.protocol,
	};
	struct px_flow *flow = bpf_map_lookup_elem(&px_flows, &fk);

	if (!flow)
		return count(RP_UNKNOWN_FLOW, SK_DROP);

	__u32 worker = job_hash(flow->job_id) % cfg->workers;

	if (bpf_sk_select_reuseport(ctx, &rp_workers, &worker, 0) < 0)
		return count(RP_NO_WORKER, SK_DROP);
	return count(RP_SELECTED, SK_PASS);
}

char LICENSE[] SEC("license") = "Apache-2.0";
