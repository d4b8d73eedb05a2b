// SPDX-License-Identifier: Apache-2.0
/*
 * egressd tier 1: tc ingress (clsact, direct action) on the host end of each
 * sandbox veth. See DESIGN.md, "The packet path", step 3.
 *
 * Every frame gets exactly one verdict and bumps exactly one counter
 * {ingress ifindex, reason}. In order:
 *
 *   config missing                           -> drop      not_configured
 *   no sandbox entry for the ingress ifindex -> drop      no_policy
 *   VLAN tag (already moved to skb metadata) -> drop      not_ipv4
 *   ARP, sender MAC/IP the sandbox's         -> pass      arp (else drop spoofed)
 *   IPv6                                     -> drop      ipv6
 *   any other non-IPv4 ethertype             -> drop      not_ipv4
 *   Ethernet source != sandbox MAC           -> drop      spoofed_mac
 *   truncated, bad version/IHL/length        -> drop      malformed
 *   IPv4 source != sandbox IP                -> drop      spoofed_ip
 *   fragment (MF or offset != 0)             -> drop      fragment
 *   IPv4 options (IHL > 5)                   -> drop      ip_options
 *   resolver, UDP or TCP SYN to port 53, the
 *   sandbox's DNS bucket empty               -> drop      dns_rate_limit
 *   resolver, UDP or TCP dst port 53         -> redirect  redirected
 *   any other UDP                            -> drop      udp_not_dns
 *   destination in t1_denied (LPM)           -> drop      the entry's reason, unless the
 *                                                         entry is overridable and the
 *                                                         sandbox has a t1_exempt entry
 *                                                         (a pure SYN: answered, RST)
 *   any other protocol (ICMP ...)            -> drop      proto_not_allowed
 *   TCP to a port outside the job's bitmap   -> drop      port_not_allowed (SYN: RST)
 *   TCP SYN without ACK, the sandbox's SYN
 *   bucket empty                             -> drop      syn_rate_limit
 *   TCP, allowed                             -> redirect  redirected (to the TUN)
 *
 * "redirect" is the TUN for the userspace data path; with the kernel data
 * path it is a tail call into t1_forward (bpf/node.c), which encapsulates.
 *
 * Token buckets (struct t1_bucket, one for DNS and one for SYNs in each
 * sandbox entry) are GCRA: one u64 "theoretical arrival time" per bucket,
 * advanced by a packet's cost in nanoseconds with compare-and-swap, so the
 * limit is exact across CPUs with no lock. A GSO super-packet pays for each
 * of its segments (and is counted once). A SYN takes a token only once every
 * allow check has passed: denied SYNs are dropped by their own reason and
 * never spend the job's rate.
 *
 * A refused SYN is answered. A pure SYN (no ACK, RST or FIN, no payload)
 * denied as port_not_allowed, denied_range or fleet_range becomes, in place,
 * the RST|ACK a closed port would send (MACs, addresses and ports swapped,
 * seq 0, ack = its seq + 1, no options, checksums updated with the csum
 * helpers so that CHECKSUM_PARTIAL skbs stay right) and is redirected out of
 * the veth it came in on, i.e. back to the sandbox: connect() fails at once
 * with ECONNREFUSED instead of waiting out its timeout. It still counts as a
 * drop with its reason. Never answered: a SYN failing a spoof check (it is
 * dropped before any answer could be built, and an answer only ever goes to
 * the sandbox's own, checked, address), a RST, malformed frames, fragments,
 * IP options, SYNs to multicast/broadcast/0/8/127/8 destinations, and
 * syn_rate_limit/dns_rate_limit (a RST invites an instant retry, which would
 * turn a rate limit into a retry storm; a dropped SYN backs off by itself).
 *
 * Denials are events. Every drop once the sandbox entry is found is offered to
 * t1_events (a ring buffer the agent reads): {ifindex, reason, daddr, dport,
 * proto, time, flags, suppressed}. A third bucket in the sandbox entry limits
 * each sandbox's events (the agent sets a few a second); a denial that finds it
 * empty, or the ring full, only adds one to the entry's `suppressed`, which the
 * next event carries and resets, so no denial goes unaccounted and a flood
 * cannot flood the log.
 *
 * Counters count skbs (a GSO super-packet once) and their length on the veth,
 * Ethernet header included. The agent (egressd/agent/tier1.py) fills every
 * map; the struct layouts and the reason enum below are mirrored there, and a
 * unit test checks them against this file.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_arp.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* Keep in sync with egressd.agent.tier1.Reason (checked by a unit test). */
enum t1_reason {
	T1_REDIRECTED = 0,
	T1_ARP = 1,
	T1_NOT_CONFIGURED = 2,
	T1_NO_POLICY = 3,
	T1_MALFORMED = 4,
	T1_SPOOFED = 5,
	T1_IPV6 = 6,
	T1_NOT_IPV4 = 7,
	T1_SPOOFED_MAC = 8,
	T1_SPOOFED_IP = 9,
	T1_FRAGMENT = 10,
	T1_UDP_NOT_DNS = 11,
	T1_DENIED_RANGE = 12,
	T1_FLEET_RANGE = 13,
	T1_PORT_NOT_ALLOWED = 14,
	T1_PROTO_NOT_ALLOWED = 15,
	T1_IP_OPTIONS = 16,
	T1_DNS_RATE_LIMIT = 17,
	T1_SYN_RATE_LIMIT = 18,
	T1_REASON_COUNT = 19,
};

#define T1_DNS_PORT 53
#define T1_PORT_BITMAP_BYTES (65536 / 8)
#define T1_DENIED_OVERRIDABLE 1u
#define T1_IP_MF 0x2000
#define T1_IP_OFFSET 0x1fff
/* Ethernet + the longest IPv4 header + a TCP header without options. */
#define T1_PULL_LEN (ETH_HLEN + 60 + 20)
/* Compare-and-swap attempts before a contended bucket drops (fails closed). */
#define T1_BUCKET_TRIES 8
/* t1_event.flags: tier 1 answered the SYN with a RST. */
#define T1_EVENT_RST 1u
#define T1_EVENTS_BYTES (256 * 1024)
#define T1_RST_LEN (ETH_HLEN + 20 + 20)

struct t1_config {
	__u32 tun_ifindex;
	__be32 resolver;
};

/* A packet conforms when, after it, the bucket owes at most depth_ns of
 * credit: tat_ns = max(tat_ns, now) + cost_ns <= now + depth_ns. The agent
 * writes cost_ns = ceil(1e9 / rate) and depth_ns = burst * cost_ns with
 * tat_ns = 0 (a full bucket); only the program moves tat_ns. */
struct t1_bucket {
	__u64 cost_ns;
	__u64 depth_ns;
	__u64 tat_ns;
};

struct t1_sandbox {
	__be32 ip;
	__u8 mac[ETH_ALEN];
	__u16 reserved;
	__u32 pad; /* the buckets are 8-byte aligned */
	struct t1_bucket dns;
	struct t1_bucket syn;
	struct t1_bucket events;
	__u64 suppressed; /* denials without an event since the last event */
	/* bit (port & 7) of byte (port >> 3): TCP destination ports the job may use */
	__u8 tcp_ports[T1_PORT_BITMAP_BYTES];
};

struct t1_denied_key {
	__u32 prefixlen; /* 0..32 */
	__be32 addr;
};

struct t1_denied {
	__u32 reason; /* enum t1_reason */
	__u32 flags;  /* T1_DENIED_OVERRIDABLE */
};

struct t1_exempt_key {
	__u32 prefixlen; /* 32 (the ifindex) + the network's prefix length */
	__u32 ifindex;
	__be32 addr;
};

struct t1_counter_key {
	__u32 ifindex;
	__u32 reason;
};

struct t1_counter {
	__u64 packets;
	__u64 bytes;
};

/* One denial, as the agent reads it from t1_events. */
struct t1_event {
	__u64 ts_ns; /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
	__u32 ifindex;
	__u32 reason;
	__be32 daddr;  /* 0 before the IPv4 header was read */
	__be16 dport;  /* TCP/UDP only */
	__u8 proto;
	__u8 flags;    /* T1_EVENT_RST */
	__u32 suppressed;
	__u32 pad;
};

/* What an event says about the denied packet (zeros where unknown). */
struct t1_flow {
	__be32 daddr;
	__be16 dport;
	__u8 proto;
	__u8 pad;
};

struct arp_ipv4 {
	struct arphdr hdr;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct t1_config);
} t1_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct t1_sandbox);
} t1_sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct t1_denied_key);
	__type(value, struct t1_denied);
} t1_denied SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct t1_exempt_key);
	__type(value, __u32);
} t1_exempt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct t1_counter_key);
	__type(value, struct t1_counter);
} t1_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, T1_EVENTS_BYTES);
} t1_events SEC(".maps");

/* Slot 0: the kernel data path's encapsulation (bpf/node.c node_encap), set by
 * the agent with "datapath": "kernel". Empty, or the tail call failing, means
 * the userspace path: the TUN. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} t1_forward SEC(".maps");

static __always_inline int count(struct __sk_buff *skb, __u32 ifindex, __u32 reason, int action)
{
	struct t1_counter_key key = { .ifindex = ifindex, .reason = reason };
	struct t1_counter *c = bpf_map_lookup_elem(&t1_counters, &key);

	if (!c) {
		struct t1_counter first = { .packets = 1, .bytes = skb->len };

		if (bpf_map_update_elem(&t1_counters, &key, &first, BPF_NOEXIST) == 0)
			return action;
		/* Another CPU created it first; count into this CPU's slot. */
		c = bpf_map_lookup_elem(&t1_counters, &key);
		if (!c)
			return action;
	}
	c->packets += 1;
	c->bytes += skb->len;
	return action;
}

static __always_inline int drop(struct __sk_buff *skb, __u32 ifindex, __u32 reason)
{
	return count(skb, ifindex, reason, TC_ACT_SHOT);
}

/* An allowed frame: counted as redirected, then encapsulated in the kernel
 * (t1_forward) or, without it, handed to the agent's TUN. */
static __always_inline int forward(struct __sk_buff *skb, __u32 ifindex, __u32 tun_ifindex)
{
	count(skb, ifindex, T1_REDIRECTED, 0);
	bpf_tail_call(skb, &t1_forward, 0);
	return bpf_redirect(tun_ifindex, 0);
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline int ip_eq(const __u8 *a, __be32 b)
{
	const __u8 *c = (const __u8 *)&b;

	return a[0] == c[0] && a[1] == c[1] && a[2] == c[2] && a[3] == c[3];
}

/* Take `n` packets' credit from `b`; 0 when the bucket cannot pay (or has no
 * rate, or stays contended): the caller drops. */
static __always_inline int take_tokens(struct t1_bucket *b, __u64 n)
{
	__u64 cost = b->cost_ns * n;
	__u64 depth = b->depth_ns;
	__u64 now = bpf_ktime_get_ns();

	if (!cost)
		return 0;
	for (int i = 0; i < T1_BUCKET_TRIES; i++) {
		__u64 tat = *(volatile __u64 *)&b->tat_ns;
		__u64 next = (tat > now ? tat : now) + cost;

		if (next - now > depth)
			return 0;
		if (__sync_val_compare_and_swap(&b->tat_ns, tat, next) == tat)
			return 1;
	}
	return 0;
}

/* Take the credit of every packet in `skb` from `b`: a UDP GSO super-packet
 * carries gso_segs datagrams, each a query. */
static __always_inline int take_token(struct __sk_buff *skb, struct t1_bucket *b)
{
	return take_tokens(b, skb->gso_segs > 1 ? skb->gso_segs : 1);
}

/* Offer one denial to t1_events, within the sandbox's event bucket; what does
 * not fit is added to `suppressed` and reported by the next event. */
static __always_inline void report(struct t1_sandbox *sb, __u32 ifindex, __u32 reason,
				   const struct t1_flow *flow, __u8 flags)
{
	if (!take_tokens(&sb->events, 1)) {
		__sync_fetch_and_add(&sb->suppressed, 1);
		return;
	}
	__u64 missed = __sync_lock_test_and_set(&sb->suppressed, 0);
	struct t1_event *e = bpf_ringbuf_reserve(&t1_events, sizeof(*e), 0);

	if (!e) {
		__sync_fetch_and_add(&sb->suppressed, missed + 1);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->ifindex = ifindex;
	e->reason = reason;
	e->daddr = flow->daddr;
	e->dport = flow->dport;
	e->proto = flow->proto;
	e->flags = flags;
	e->suppressed = missed > 0xffffffffu ? 0xffffffffu : (__u32)missed;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

/* A drop after the sandbox entry was found: counted, and reported. */
static __always_inline int deny(struct __sk_buff *skb, __u32 ifindex, struct t1_sandbox *sb,
				__u32 reason, const struct t1_flow *flow)
{
	count(skb, ifindex, reason, TC_ACT_SHOT);
	report(sb, ifindex, reason, flow, 0);
	return TC_ACT_SHOT;
}

#define T1_IP_OFF ETH_HLEN
#define T1_TCP_OFF (ETH_HLEN + 20)
#define T1_IP_CSUM_OFF (T1_IP_OFF + __builtin_offsetof(struct iphdr, check))
#define T1_IP_TOT_LEN_OFF (T1_IP_OFF + __builtin_offsetof(struct iphdr, tot_len))
#define T1_IP_SADDR_OFF (T1_IP_OFF + __builtin_offsetof(struct iphdr, saddr))
#define T1_TCP_CSUM_OFF (T1_TCP_OFF + __builtin_offsetof(struct tcphdr, check))

/* Rewrite the pure SYN in `skb` (Ethernet + a 20-byte IPv4 header + a TCP
 * header of `tcp_len` bytes, no payload: the caller checked) into the RST|ACK
 * a closed port answers with (RFC 9293 3.10.7.1: seq 0, ack = SEG.SEQ + 1).
 * The checksums are updated, not recomputed: the csum helpers keep a
 * CHECKSUM_PARTIAL skb (a kernel sender's SYN on a veth) consistent, where a
 * freshly computed TCP checksum would be wrong. 0 on success; otherwise the
 * frame may be half rewritten and must be dropped. */
static __always_inline int rewrite_as_rst(struct __sk_buff *skb, __u32 tcp_len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);

	if ((void *)(tcp + 1) > data_end || tcp_len < sizeof(*tcp) || tcp_len > 60)
		return -1;

	__u8 macs[2 * ETH_ALEN];
	__be32 addrs[2] = { ip->daddr, ip->saddr };
	__be16 old_tot = ip->tot_len;
	__be16 new_tot = bpf_htons(20 + sizeof(*tcp));
	struct tcphdr rst = {};
	__u32 old_tcp[15] = {};

	__builtin_memcpy(macs, eth->h_source, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, eth->h_dest, ETH_ALEN);
	rst.source = tcp->dest;
	rst.dest = tcp->source;
	rst.ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + 1);
	rst.doff = sizeof(rst) / 4;
	rst.rst = 1;
	rst.ack = 1;
	/* The difference of the TCP header sums, check fields left out of both
	 * (zero), options of the old one included (the zero tail adds nothing). */
	if (bpf_skb_load_bytes(skb, T1_TCP_OFF, old_tcp, tcp_len) < 0)
		return -1;
	((__u16 *)old_tcp)[8] = 0;
	__s64 diff = bpf_csum_diff(old_tcp, sizeof(old_tcp), (__be32 *)&rst, sizeof(rst), 0);

	if (diff < 0)
		return -1;
	rst.check = tcp->check;

	/* Swapped addresses keep both sums; only the lengths change them. */
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0 ||
	    bpf_skb_store_bytes(skb, T1_IP_SADDR_OFF, addrs, sizeof(addrs), 0) < 0 ||
	    bpf_l3_csum_replace(skb, T1_IP_CSUM_OFF, old_tot, new_tot, sizeof(new_tot)) < 0 ||
	    bpf_skb_store_bytes(skb, T1_IP_TOT_LEN_OFF, &new_tot, sizeof(new_tot), 0) < 0 ||
	    bpf_skb_store_bytes(skb, T1_TCP_OFF, &rst, sizeof(rst), 0) < 0 ||
	    bpf_l4_csum_replace(skb, T1_TCP_CSUM_OFF, 0, diff, 0) < 0 ||
	    bpf_l4_csum_replace(skb, T1_TCP_CSUM_OFF, bpf_htons(tcp_len),
				bpf_htons(sizeof(rst)), BPF_F_PSEUDO_HDR | sizeof(__u16)) < 0)
		return -1;
	if (skb->len != T1_RST_LEN && bpf_skb_change_tail(skb, T1_RST_LEN, 0) < 0)
		return -1;
	return 0;
}

/* A denial of a pure SYN: answered with a RST back out of the sandbox's veth
 * (bpf_redirect to the egress of the ingress device), counted and reported
 * as the drop it is. */
static __always_inline int refuse(struct __sk_buff *skb, __u32 ifindex, struct t1_sandbox *sb,
				  __u32 reason, const struct t1_flow *flow, __u32 tcp_len)
{
	count(skb, ifindex, reason, TC_ACT_SHOT);
	if (rewrite_as_rst(skb, tcp_len) == 0) {
		report(sb, ifindex, reason, flow, T1_EVENT_RST);
		return bpf_redirect(ifindex, 0);
	}
	report(sb, ifindex, reason, flow, 0);
	return TC_ACT_SHOT;
}

/* RFC 1122 4.2.3.10 and 1812: no RST to a broadcast or multicast address, and
 * none from an address no host has (0/8, loopback). */
static __always_inline int answerable(__be32 daddr)
{
	__u8 first = bpf_ntohl(daddr) >> 24;

	return first != 0 && first != 127 && first < 224;
}

static __always_inline int handle_arp(struct __sk_buff *skb, __u32 ifindex,
				      struct t1_sandbox *sb, struct ethhdr *eth,
				      void *data_end)
{
	struct arp_ipv4 *arp = (void *)(eth + 1);
	struct t1_flow none = {};

	if ((void *)(arp + 1) > data_end)
		return deny(skb, ifindex, sb, T1_MALFORMED, &none);
	if (arp->hdr.ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->hdr.ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->hdr.ar_hln != ETH_ALEN || arp->hdr.ar_pln != 4)
		return deny(skb, ifindex, sb, T1_MALFORMED, &none);
	if (!mac_eq(eth->h_source, sb->mac) || !mac_eq(arp->sha, sb->mac) ||
	    !ip_eq(arp->sip, sb->ip))
		return deny(skb, ifindex, sb, T1_SPOOFED, &none);
	return count(skb, ifindex, T1_ARP, TC_ACT_OK);
}

static __always_inline int port_allowed(const struct t1_sandbox *sb, __be16 port_be)
{
	__u32 port = bpf_ntohs(port_be) & 0xffff;

	return sb->tcp_ports[(port >> 3) & (T1_PORT_BITMAP_BYTES - 1)] & (1u << (port & 7));
}

static __always_inline int denied(__u32 ifindex, __be32 daddr, __u32 *reason)
{
	struct t1_denied_key key = { .prefixlen = 32, .addr = daddr };
	struct t1_denied *entry = bpf_map_lookup_elem(&t1_denied, &key);

	if (!entry)
		return 0;
	*reason = entry->reason < T1_REASON_COUNT ? entry->reason : T1_DENIED_RANGE;
	if (entry->flags & T1_DENIED_OVERRIDABLE) {
		struct t1_exempt_key ekey = { .prefixlen = 64, .ifindex = ifindex, .addr = daddr };

		if (bpf_map_lookup_elem(&t1_exempt, &ekey))
			return 0;
	}
	return 1;
}

SEC("tc")
int tier1_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ingress_ifindex;
	__u32 zero = 0;
	struct t1_config *cfg = bpf_map_lookup_elem(&t1_config, &zero);

	if (!cfg || !cfg->tun_ifindex)
		return drop(skb, ifindex, T1_NOT_CONFIGURED);

	struct t1_sandbox *sb = bpf_map_lookup_elem(&t1_sandboxes, &ifindex);

	if (!sb)
		return drop(skb, ifindex, T1_NO_POLICY);

	__u32 len = skb->len;
	__u32 want = len < T1_PULL_LEN ? len : T1_PULL_LEN;

	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct t1_flow flow = {};

	if ((void *)(eth + 1) > data_end)
		return deny(skb, ifindex, sb, T1_MALFORMED, &flow);
	/* The receive path strips an 802.1Q/802.1ad tag into skb metadata before
	 * tc runs: the frame below would look untagged, and a TUN would be handed
	 * the tag back on read. */
	if (skb->vlan_present)
		return deny(skb, ifindex, sb, T1_NOT_IPV4, &flow);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return handle_arp(skb, ifindex, sb, eth, data_end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return deny(skb, ifindex, sb, T1_IPV6, &flow);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return deny(skb, ifindex, sb, T1_NOT_IPV4, &flow);
	if (!mac_eq(eth->h_source, sb->mac))
		return deny(skb, ifindex, sb, T1_SPOOFED_MAC, &flow);

	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		return deny(skb, ifindex, sb, T1_MALFORMED, &flow);
	__u32 ihl = ip->ihl * 4;
	__u32 tot_len = bpf_ntohs(ip->tot_len);

	flow.daddr = ip->daddr;
	flow.proto = ip->protocol;
	if (ip->version != 4 || ihl < sizeof(*ip) || (void *)ip + ihl > data_end ||
	    tot_len < ihl || tot_len > len - ETH_HLEN)
		return deny(skb, ifindex, sb, T1_MALFORMED, &flow);
	if (ip->saddr != sb->ip)
		return deny(skb, ifindex, sb, T1_SPOOFED_IP, &flow);
	if (ip->frag_off & bpf_htons(T1_IP_MF | T1_IP_OFFSET))
		return deny(skb, ifindex, sb, T1_FRAGMENT, &flow);
	/* Source routes, record-route, router alert ...: nothing a sandbox needs,
	 * and options would only widen what tier 2 has to parse. */
	if (ihl != sizeof(*ip))
		return deny(skb, ifindex, sb, T1_IP_OPTIONS, &flow);

	void *l4 = (void *)ip + ihl;
	__be32 daddr = ip->daddr;
	__be16 dport = 0;
	int syn = 0;
	/* A pure SYN without payload, which tier 1 may answer with a RST. */
	__u32 rst_len = 0;

	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end || tot_len < ihl + sizeof(*udp))
			return deny(skb, ifindex, sb, T1_MALFORMED, &flow);
		flow.dport = udp->dest;
		if (daddr == cfg->resolver && udp->dest == bpf_htons(T1_DNS_PORT)) {
			if (!take_token(skb, &sb->dns))
				return deny(skb, ifindex, sb, T1_DNS_RATE_LIMIT, &flow);
			return forward(skb, ifindex, cfg->tun_ifindex);
		}
		return deny(skb, ifindex, sb, T1_UDP_NOT_DNS, &flow);
	}
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end || tot_len < ihl + sizeof(*tcp) || tcp->doff < 5)
			return deny(skb, ifindex, sb, T1_MALFORMED, &flow);
		dport = tcp->dest;
		flow.dport = dport;
		syn = tcp->syn && !tcp->ack;
		if (syn && !tcp->rst && !tcp->fin && tot_len == ihl + tcp->doff * 4 &&
		    skb->gso_segs <= 1 && answerable(daddr))
			rst_len = tcp->doff * 4;
		if (daddr == cfg->resolver && dport == bpf_htons(T1_DNS_PORT)) {
			/* One query's connection: its SYN takes a DNS token, not a SYN one. */
			if (syn && !take_token(skb, &sb->dns))
				return deny(skb, ifindex, sb, T1_DNS_RATE_LIMIT, &flow);
			return forward(skb, ifindex, cfg->tun_ifindex);
		}
	}

	__u32 reason = T1_DENIED_RANGE;

	if (denied(ifindex, daddr, &reason)) {
		if (rst_len)
			return refuse(skb, ifindex, sb, reason, &flow, rst_len);
		return deny(skb, ifindex, sb, reason, &flow);
	}
	if (ip->protocol != IPPROTO_TCP)
		return deny(skb, ifindex, sb, T1_PROTO_NOT_ALLOWED, &flow);
	if (!port_allowed(sb, dport)) {
		if (rst_len)
			return refuse(skb, ifindex, sb, T1_PORT_NOT_ALLOWED, &flow, rst_len);
		return deny(skb, ifindex, sb, T1_PORT_NOT_ALLOWED, &flow);
	}
	if (syn && !take_token(skb, &sb->syn))
		return deny(skb, ifindex, sb, T1_SYN_RATE_LIMIT, &flow);
	return forward(skb, ifindex, cfg->tun_ifindex);
}

char LICENSE[] SEC("license") = "Apache-2.0";
