// SPDX-License-Identifier: Apache-2.0
/*
 * egressd proxy kernel data path (DESIGN.md, "The packet path", step 5, and
 * the return path; proxy config "datapath": "kernel").
 *
 * px_ingress: tc ingress (clsact, direct action) on the proxy's underlay.
 * Frames that are not IPv4/UDP to (config.underlay, config.port) pass
 * untouched. A GENEVE datagram gets exactly one of:
 *
 *   drop    counted in px_stats by reason (the names of the Python endpoint,
 *           egressd.proxy.endpoint / egressd.geneve.codec, plus the outer
 *           header's own, which the kernel's ip_rcv would otherwise check);
 *   slow    TC_ACT_OK unchanged: the kernel delivers it to the Python endpoint
 *           on UDP 6081, which validates it again, fetches and verifies the
 *           job's policy, programs px_jobs/px_bound/px_flows and injects the
 *           inner packet through the TUN (egressd.proxy.kernel);
 *   fast    the flow is recorded in px_flows, the outer headers are removed
 *           (bpf_skb_adjust_room, DECAP_L3_IPV4), skb->mark = config.mark and
 *           TC_ACT_OK: the inner packet meets nftables TPROXY in PREROUTING,
 *           which matches that mark (the mark never comes from the wire, so a
 *           plain packet from the underlay with a sandbox source is not
 *           TPROXYed).
 *
 * Checks, in the Python endpoint's order (the first failing names the drop):
 *   outer IPv4: a fragment goes up (slow: the kernel reassembles, Python
 *   validates); total length within the frame (outer_bad_length), header
 *   checksum (outer_bad_checksum), UDP length within the IP packet
 *   (outer_bad_length); a bad version/IHL is left to ip_rcv, which drops it.
 *   registered node (px_nodes by outer source)            unknown_node
 *   GENEVE header, options, inner IPv4 header             the codec's reasons
 *   VNI                                                   bad_vni
 *   inner source in the node's sandbox CIDR               source_outside_node_cidr
 *   TCP or UDP, not a fragment, whole L4 header, ports    proto_not_allowed,
 *                                                         fragmented, malformed_l4
 *   an offload option (TUN offload peers)                 slow (Python decides)
 *   (job id, digest) in px_jobs, before its until_ns      else slow
 *   (job id, node) in px_bound                            job_not_bound_to_node
 *
 * px_jobs holds only the digest of the job's current verified policy: a
 * datagram with any other digest (grace, re-signed copy, stale, unknown) goes
 * the slow path, where egressd.proxy.digests decides it as before. until_ns
 * (CLOCK_BOOTTIME) is the policy's exp: an entry the userspace forgot to
 * remove stops matching by itself.
 *
 * px_egress: tc egress on the TUN (an L3 device: the packet starts at its
 * IPv4 header). The kernel routes the sandbox supernet there. A TCP/UDP
 * packet whose destination is in a node's sandbox CIDR (px_sandboxes, LPM ->
 * node underlay) and whose reversed 5-tuple has a flow (px_flows: job id and
 * digest for the option) is encapsulated (outer IPv4 + UDP + GENEVE + job
 * option, 64 bytes, ENCAP_L3_IPV4 | ENCAP_L4_UDP so GSO super-packets stay
 * valid), given an Ethernet header (bpf_redirect_neigh expects one and
 * replaces it) and redirected to the underlay with bpf_redirect_neigh. An ICMP
 * error (destination unreachable, time exceeded, parameter problem) the proxy's
 * kernel sends about a sandbox's packet goes back the same way under the flow
 * of the packet it quotes (its IPv4 header and first 8 bytes: the quoted
 * source must be the sandbox the error goes to, and the quoted 5-tuple, the
 * sandbox -> internet direction, must be in px_flows), as the Python return
 * path (egressd.proxy.tunnel._quoted_flow) does. Anything else (other ICMP, an
 * error quoting an unknown flow, IP options, no node, no flow) stays on the
 * TUN, where the Python return path decides it as in the userspace data path
 * (an error without its flow there too is dropped, no_flow: fail closed).
 *
 * The encapsulation is bpf/geneve.h's gnv_encap (the node's too: DF, TTL 64,
 * UDP checksum 0, source port from the sandbox->internet flow's hash, FIXED_GSO
 * so a super-packet keeps the MSS that the TUN's MTU, 1500 - 64, gave it); the
 * prefix is built here from the flow's job option. Ingress keeps its own parser:
 * gnv_parse is stricter than the Python endpoint (exactly one option, no IP
 * options) and this program must decide and count exactly as the endpoint does.
 * Layouts and the reason enum are mirrored in
 * egressd/proxy/kernel_maps.py; a unit test checks them against this file.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "geneve.h" /* gnv_encap, shared with bpf/node.c */
#include "px_flows.h" /* px_flows, shared with bpf/reuseport.c */

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

/* Keep in sync with egressd.proxy.kernel_maps.STATS (checked by a unit test). */
enum px_stat {
	PX_UNKNOWN_NODE = 0,
	PX_TRUNCATED = 1,
	PX_BAD_VERSION = 2,
	PX_OPTIONS_PAST_END = 3,
	PX_BAD_OPTION_LENGTH = 4,
	PX_UNKNOWN_CRITICAL_OPTION = 5,
	PX_MISSING_JOB_OPTION = 6,
	PX_DUPLICATE_JOB_OPTION = 7,
	PX_UNSUPPORTED_PROTOCOL = 8,
	PX_INNER_NOT_IPV4 = 9,
	PX_INNER_TRUNCATED = 10,
	PX_INNER_BAD_CHECKSUM = 11,
	PX_BAD_VNI = 12,
	PX_SOURCE_OUTSIDE_NODE_CIDR = 13,
	PX_PROTO_NOT_ALLOWED = 14,
	PX_FRAGMENTED = 15,
	PX_MALFORMED_L4 = 16,
	PX_JOB_NOT_BOUND_TO_NODE = 17,
	PX_OUTER_BAD_LENGTH = 18,
	PX_OUTER_BAD_CHECKSUM = 19,
	PX_DECAP_FAILED = 20,
	PX_DROP_COUNT = 21, /* the reasons above are drops; below, what passed */
	PX_FAST = 21,
	PX_SLOW = 22,
	PX_RETURN = 23,
	PX_RETURN_PASS = 24,
	PX_RETURN_FAILED = 25,
	PX_STAT_COUNT = 26,
};

#define PX_GENEVE_HLEN 8
#define PX_JOB_CLASS 0xFF01
#define PX_JOB_TYPE 0x81
#define PX_OFFLOAD_TYPE 0x02
#define PX_JOB_DATA 24
#define PX_MAX_OPTION_WORDS 63
#define PX_IP_MF 0x2000
#define PX_IP_OFFSET 0x1fff
#define PX_AF_INET 2 /* <sys/socket.h> is not for BPF targets */
/* ICMP error types px_egress returns under the quoted flow (tunnel.ICMP_ERROR_TYPES). */
#define PX_ICMP_DEST_UNREACH 3
#define PX_ICMP_TIME_EXCEEDED 11
#define PX_ICMP_PARAMETERPROB 12

struct px_config {
	__be32 underlay; /* this proxy's underlay address: GENEVE's destination and return source */
	__be16 port;     /* 6081 */
	__u16 pad;
	__u32 vni;
	__u32 mark;             /* set on decapsulated packets; nftables TPROXYs on it */
	__u32 underlay_ifindex; /* where return traffic is redirected */
};

struct px_node {
	__be32 cidr_base;
	__be32 cidr_mask;
};

struct px_job_key {
	__u8 job_id[16];
	__u8 digest[8];
};

struct px_job {
	__u64 until_ns; /* CLOCK_BOOTTIME */
};

struct px_bound_key {
	__u8 job_id[16];
	__be32 node;
};

struct px_sandbox_key {
	__u32 prefixlen;
	__be32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct px_config);
} px_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, struct px_node);
} px_nodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct px_job_key);
	__type(value, struct px_job);
} px_jobs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct px_bound_key);
	__type(value, __u32);
} px_bound SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct px_sandbox_key);
	__type(value, __be32);
} px_sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PX_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} px_stats SEC(".maps");

static __always_inline void bump(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&px_stats, &stat);

	if (n)
		*n += 1;
}

static __always_inline int drop(__u32 reason)
{
	bump(reason);
	return TC_ACT_SHOT;
}

static __always_inline int slow(void)
{
	bump(PX_SLOW);
	return TC_ACT_OK;
}

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* One's-complement sum of an IPv4 header of `len` bytes (20..60) at `off`:
 * 0xffff when its checksum verifies. -1 when it cannot be read. */
static __always_inline int ip_header_ok(struct __sk_buff *skb, __u32 off, __u32 len)
{
	__u16 words[30];
	__u32 sum = 0;

	if (len < 20 || len > 60)
		return 0;
	if (bpf_skb_load_bytes(skb, off, words, 20) < 0)
		return 0;
	__u32 extra = len - 20;
	if (extra > 0 && extra <= 40 && bpf_skb_load_bytes(skb, off + 20, &words[10], extra) < 0)
		return 0;
	for (int i = 0; i < 30; i++) {
		if (i * 2 >= len)
			break;
		sum += words[i];
	}
	return fold(sum) == 0xffff;
}

static __always_inline int ids_eq(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

/* The option walk of egressd.geneve.codec._parse_options, one option per
 * bpf_loop step (a plain loop of 63 steps is too many states to verify). */
struct px_opts {
	struct __sk_buff *skb;
	__u32 g;      /* the GENEVE header's offset */
	__u32 pos;    /* the next option, from the GENEVE header */
	__u32 end;    /* where the options end */
	__u32 job_at; /* the job option's data, 0 until seen */
	__u32 offload;
	__u32 reason; /* a drop reason, 0 while none (0 is unknown_node, never set here) */
};

static long read_option(__u32 index, void *ctx)
{
	struct px_opts *o = ctx;
	__u8 oh[4];

	if (o->pos >= o->end)
		return 1;
	if (o->pos > 256 || bpf_skb_load_bytes(o->skb, o->g + o->pos, oh, sizeof(oh)) < 0) {
		o->reason = PX_BAD_OPTION_LENGTH;
		return 1;
	}
	__u16 ocls = ((__u16)oh[0] << 8) | oh[1];
	__u32 start = o->pos + 4;
	o->pos = start + (oh[3] & 0x1f) * 4;
	if (o->pos > o->end) {
		o->reason = PX_BAD_OPTION_LENGTH;
		return 1;
	}
	if (ocls == PX_JOB_CLASS && oh[2] == PX_JOB_TYPE) {
		if (o->job_at) {
			o->reason = PX_DUPLICATE_JOB_OPTION;
			return 1;
		}
		if (o->pos - start != PX_JOB_DATA) {
			o->reason = PX_BAD_OPTION_LENGTH;
			return 1;
		}
		o->job_at = start;
	} else if (oh[2] & 0x80) {
		o->reason = PX_UNKNOWN_CRITICAL_OPTION;
		return 1;
	} else if (ocls == PX_JOB_CLASS && oh[2] == PX_OFFLOAD_TYPE) {
		o->offload = 1;
	}
	return 0;
}

SEC("tc")
int px_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct px_config *cfg = bpf_map_lookup_elem(&px_config, &zero);
	struct iphdr ip;
	struct udphdr udp;

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return TC_ACT_OK;
	if (ip.protocol != IPPROTO_UDP || ip.daddr != cfg->underlay)
		return TC_ACT_OK;
	__u32 ihl = ip.ihl * 4;
	if (ip.version != 4 || ihl < 20)
		return TC_ACT_OK; /* ip_rcv drops it */
	if (ip.frag_off & bpf_htons(PX_IP_MF | PX_IP_OFFSET))
		return slow(); /* reassembled by the kernel, validated by Python */
	__u32 l3 = ETH_HLEN;
	__u32 l4 = l3 + ihl;
	if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)) < 0)
		return TC_ACT_OK;
	if (udp.dest != cfg->port)
		return TC_ACT_OK;

	/* Ours: ip_rcv has not run yet, so the outer header is checked here. */
	__u32 tot = bpf_ntohs(ip.tot_len);
	if (tot < ihl + 8 || tot > skb->len - ETH_HLEN)
		return drop(PX_OUTER_BAD_LENGTH);
	if (!ip_header_ok(skb, l3, ihl))
		return drop(PX_OUTER_BAD_CHECKSUM);
	__u32 ulen = bpf_ntohs(udp.len);
	if (ulen < 8 || ulen > tot - ihl)
		return drop(PX_OUTER_BAD_LENGTH);

	__be32 node_addr = ip.saddr;
	struct px_node *node = bpf_map_lookup_elem(&px_nodes, &node_addr);
	if (!node)
		return drop(PX_UNKNOWN_NODE);

	/* GENEVE, as egressd.geneve.codec._decode_general decides it. */
	__u32 g = l4 + 8;
	__u32 n = ulen - 8;
	__u8 gh[PX_GENEVE_HLEN];
	if (n < PX_GENEVE_HLEN || bpf_skb_load_bytes(skb, g, gh, sizeof(gh)) < 0)
		return drop(PX_TRUNCATED);
	if (gh[0] >> 6)
		return drop(PX_BAD_VERSION);
	__u32 opts_end = PX_GENEVE_HLEN + (gh[0] & 0x3f) * 4;
	if (opts_end > n)
		return drop(PX_OPTIONS_PAST_END);
	if (gh[2] != 0x08 || gh[3] != 0x00)
		return drop(PX_UNSUPPORTED_PROTOCOL);

	struct px_opts opts = {.skb = skb, .g = g, .pos = PX_GENEVE_HLEN, .end = opts_end};
	bpf_loop(PX_MAX_OPTION_WORDS, read_option, &opts, 0);
	if (opts.reason)
		return drop(opts.reason);
	if (opts.pos < opts_end)
		return slow(); /* more options than the loop reads: let Python decide */
	__u32 job_at = opts.job_at;
	int offload = opts.offload;
	if (!job_at)
		return drop(PX_MISSING_JOB_OPTION);

	__u32 in = g + opts_end; /* the inner IPv4 header */
	__u32 avail = n - opts_end;
	struct iphdr inner;
	if (avail < 1)
		return drop(PX_INNER_TRUNCATED);
	__u8 ver_ihl;
	if (bpf_skb_load_bytes(skb, in, &ver_ihl, 1) < 0)
		return drop(PX_INNER_TRUNCATED);
	if (ver_ihl >> 4 != 4 || (ver_ihl & 0x0f) < 5)
		return drop(PX_INNER_NOT_IPV4);
	__u32 iihl = (ver_ihl & 0x0f) * 4;
	if (avail < iihl || bpf_skb_load_bytes(skb, in, &inner, sizeof(inner)) < 0)
		return drop(PX_INNER_TRUNCATED);
	__u32 itot = bpf_ntohs(inner.tot_len);
	if (itot < iihl || itot > avail)
		return drop(PX_INNER_TRUNCATED);
	if (!ip_header_ok(skb, in, iihl))
		return drop(PX_INNER_BAD_CHECKSUM);

	/* egressd.proxy.endpoint.validate */
	if ((((__u32)gh[4] << 16) | ((__u32)gh[5] << 8) | gh[6]) != cfg->vni)
		return drop(PX_BAD_VNI);
	if ((inner.saddr & node->cidr_mask) != node->cidr_base)
		return drop(PX_SOURCE_OUTSIDE_NODE_CIDR);
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP)
		return drop(PX_PROTO_NOT_ALLOWED);
	if (inner.frag_off & bpf_htons(PX_IP_MF | PX_IP_OFFSET))
		return drop(PX_FRAGMENTED);
	__be16 ports[2];
	if (inner.protocol == IPPROTO_TCP) {
		__u8 doff;

		if (itot < iihl + 20 || bpf_skb_load_bytes(skb, in + iihl, ports, 4) < 0 ||
		    bpf_skb_load_bytes(skb, in + iihl + 12, &doff, 1) < 0)
			return drop(PX_MALFORMED_L4);
		__u32 dlen = (doff >> 4) * 4;
		if (dlen < 20 || iihl + dlen > itot)
			return drop(PX_MALFORMED_L4);
	} else {
		__be16 uh[3];

		if (itot < iihl + 8 || bpf_skb_load_bytes(skb, in + iihl, uh, 6) < 0)
			return drop(PX_MALFORMED_L4);
		__u32 len = bpf_ntohs(uh[2]);
		if (len < 8 || iihl + len > itot)
			return drop(PX_MALFORMED_L4);
		ports[0] = uh[0];
		ports[1] = uh[1];
	}
	if (!ports[0] || !ports[1])
		return drop(PX_MALFORMED_L4);
	if (offload)
		return slow();

	struct px_job_key jk;
	if (bpf_skb_load_bytes(skb, g + job_at, &jk, sizeof(jk)) < 0)
		return drop(PX_BAD_OPTION_LENGTH);
	struct px_job *job = bpf_map_lookup_elem(&px_jobs, &jk);
	if (!job || bpf_ktime_get_boot_ns() >= job->until_ns)
		return slow();
	struct px_bound_key bk = {.node = node_addr};
	__builtin_memcpy(bk.job_id, jk.job_id, sizeof(bk.job_id));
	if (!bpf_map_lookup_elem(&px_bound, &bk))
		return drop(PX_JOB_NOT_BOUND_TO_NODE);

	struct px_flow_key fk = {
		.src = inner.saddr,
		.dst = inner.daddr,
		.sport = ports[0],
		.dport = ports[1],
		.proto = inner.protocol,
	};
	struct px_flow *seen = bpf_map_lookup_elem(&px_flows, &fk);
	if (!seen || !ids_eq(seen->job_id, jk.job_id) || seen->node != node_addr) {
		struct px_flow fv = {.node = node_addr};

		__builtin_memcpy(fv.job_id, jk.job_id, sizeof(fv.job_id));
		__builtin_memcpy(fv.digest, jk.digest, sizeof(fv.digest));
		bpf_map_update_elem(&px_flows, &fk, &fv, BPF_ANY);
	}

	/* FIXED_GSO: a super-packet keeps its sender's MSS. */
	if (bpf_skb_adjust_room(skb, -(__s32)(ihl + 8 + opts_end), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return drop(PX_DECAP_FAILED);
	skb->mark = cfg->mark;
	bump(PX_FAST);
	return TC_ACT_OK;
}

static __always_inline int pass_back(void)
{
	bump(PX_RETURN_PASS);
	return TC_ACT_OK;
}

/* The px_flows key of the sandbox packet an ICMP error (IPv4 header without
 * options at 0, going to `sandbox`) quotes after its 8-byte ICMP header; 0, or
 * -1 when it is no error type of ours or quotes no TCP/UDP packet of `sandbox`. */
static __always_inline int icmp_quoted_key(struct __sk_buff *skb, __be32 sandbox,
					   struct px_flow_key *fk)
{
	__u8 type;
	struct iphdr q;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, 20, &type, sizeof(type)) < 0)
		return -1;
	if (type != PX_ICMP_DEST_UNREACH && type != PX_ICMP_TIME_EXCEEDED &&
	    type != PX_ICMP_PARAMETERPROB)
		return -1;
	if (bpf_skb_load_bytes(skb, 28, &q, sizeof(q)) < 0)
		return -1;
	if (q.version != 4 || q.ihl < 5 || q.saddr != sandbox)
		return -1;
	if (q.protocol != IPPROTO_TCP && q.protocol != IPPROTO_UDP)
		return -1;
	if (bpf_skb_load_bytes(skb, 28 + q.ihl * 4, ports, sizeof(ports)) < 0)
		return -1;
	fk->src = q.saddr;
	fk->dst = q.daddr;
	fk->sport = ports[0];
	fk->dport = ports[1];
	fk->proto = q.protocol;
	return 0;
}

SEC("tc")
int px_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct px_config *cfg = bpf_map_lookup_elem(&px_config, &zero);
	struct iphdr ip;
	__be16 ports[2];

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
		return pass_back();
	if (ip.version != 4 || ip.ihl != 5 || (ip.frag_off & bpf_htons(PX_IP_MF | PX_IP_OFFSET)))
		return pass_back();
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP &&
	    ip.protocol != IPPROTO_ICMP)
		return pass_back();
	struct px_sandbox_key sk = {.prefixlen = 32, .addr = ip.daddr};
	__be32 *node = bpf_map_lookup_elem(&px_sandboxes, &sk);
	if (!node)
		return pass_back();
	struct px_flow_key fk = {};
	if (ip.protocol == IPPROTO_ICMP) {
		if (icmp_quoted_key(skb, ip.daddr, &fk) < 0)
			return pass_back();
	} else {
		if (bpf_skb_load_bytes(skb, 20, ports, sizeof(ports)) < 0)
			return pass_back();
		fk.src = ip.daddr;
		fk.dst = ip.saddr;
		fk.sport = ports[1];
		fk.dport = ports[0];
		fk.proto = ip.protocol;
	}
	struct px_flow *flow = bpf_map_lookup_elem(&px_flows, &fk);
	if (!flow)
		return pass_back();

	__be32 node_addr = *node;
	/* The prefix the codec's header_for builds: C flag set (the job option is critical). */
	struct gnv_hdr h = {
		.ver_optlen = GNV_OPTLEN_WORDS,
		.flags = GNV_FLAG_CRITICAL,
		.protocol = bpf_htons(ETH_P_IP),
		.vni_rsvd = bpf_htonl(cfg->vni << 8),
		.opt_class = bpf_htons(GNV_OPT_CLASS),
		.opt_type = GNV_OPT_TYPE_JOB,
		.opt_len = PX_JOB_DATA / 4,
	};
	__builtin_memcpy(h.job_id, flow->job_id, sizeof(h.job_id));
	__builtin_memcpy(h.digest, flow->digest, sizeof(h.digest));
	__be16 sport = gnv_source_port(gnv_flow_hash(fk.src, fk.dst, fk.proto, fk.sport, fk.dport));
	if (gnv_encap(skb, 0, cfg->underlay, node_addr, sport, (const struct gnv_prefix *)&h) < 0) {
		bump(PX_RETURN_FAILED);
		return TC_ACT_SHOT;
	}
	/* bpf_redirect_neigh pulls an Ethernet header (it is written for redirects
	 * from L2 devices): give it one; the neighbour code rewrites it. */
	struct ethhdr eth = {.h_proto = bpf_htons(ETH_P_IP)};
	if (bpf_skb_change_head(skb, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0) {
		bump(PX_RETURN_FAILED);
		return TC_ACT_SHOT;
	}
	struct bpf_redir_neigh nh = {.nh_family = PX_AF_INET, .ipv4_nh = node_addr};
	bump(PX_RETURN);
	return bpf_redirect_neigh(cfg->underlay_ifindex, &nh, sizeof(nh), 0);
}

char LICENSE[] SEC("license") = "Apache-2.0";
