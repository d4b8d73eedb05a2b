// SPDX-License-Identifier: Apache-2.0
/*
 * egressd node data path in tc (agent config "datapath": "kernel"); see
 * DESIGN.md, "The packet path", step 4 and the return path, and
 * docs/decisions.md ("The node's kernel data path").
 *
 * node_encap: the tail call of tier 1 (bpf/tier1.c, t1_forward) for every
 * frame tier 1 allowed, on the sandbox veth's tc ingress. It finds the sandbox
 * (nd_sandboxes, by ingress ifindex), the flow's proxy (nd_flows, an LRU of
 * inner 5-tuple -> proxy slot and generation; a miss, or a pinned proxy that
 * is down or whose slot was reused, picks from the Maglev table
 * nd_maglev[active][hash % ND_MAGLEV_SIZE] and pins the result), encapsulates
 * (bpf/geneve.h: the sandbox's 36-byte GENEVE prefix, outer source the node's
 * underlay address, UDP source port from the flow hash) and redirects to the
 * underlay with bpf_redirect_neigh (the kernel's FIB and neighbour table fill
 * in L2).
 *
 * node_underlay_ingress: tc ingress on the node's underlay device. Anything
 * but IPv4/UDP to the node's underlay address and the GENEVE port passes
 * untouched (ARP, the agent's health probes and admin API, ...). GENEVE is
 * accepted only from a registered proxy (nd_proxy_addrs), fully validated
 * (gnv_parse: the program runs before ip_rcv), with the fleet's VNI, for an
 * inner destination that is a registered sandbox (nd_sandbox_ips) carrying
 * that sandbox's job id; it is decapsulated, given the sandbox's MACs and
 * redirected with bpf_redirect_peer into the sandbox's namespace.
 *
 * Every drop bumps nd_drops[reason] (per CPU); carried packets bump the
 * proxy's nd_stats slot. Map layouts are mirrored in
 * egressd/agent/node_maps.py (a unit test compares the reason enum).
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

#include "geneve.h"

#define ND_MAX_PROXIES 256
#define ND_MAX_SANDBOXES 4096
#define ND_MAX_FLOWS 262144
/* A prime: Maglev needs the permutation skips coprime with the size. */
#define ND_MAGLEV_SIZE 16381
#define ND_NO_PROXY 0xffffffffu
#define ND_PROXY_UP 1u

/* Keep in sync with egressd.agent.node_maps.NodeReason (checked by a unit test). */
enum nd_reason {
	ND_NOT_CONFIGURED = 0,
	ND_NO_SANDBOX = 1,
	ND_MALFORMED = 2,
	ND_NO_HEALTHY_PROXY = 3,
	ND_TOO_BIG = 4,
	ND_ENCAP_FAILED = 5,
	ND_UNKNOWN_PROXY = 6,
	ND_UNKNOWN_VNI = 7,
	ND_UNKNOWN_SANDBOX = 8,
	ND_JOB_MISMATCH = 9,
	ND_DECAP_FAILED = 10,
	/* gnv_parse's results, in its order from GNV_OUTER_MALFORMED */
	ND_OUTER_MALFORMED = 11,
	ND_OUTER_IP_OPTIONS = 12,
	ND_OUTER_BAD_CHECKSUM = 13,
	ND_OUTER_FRAGMENT = 14,
	ND_UDP_MALFORMED = 15,
	ND_TRUNCATED = 16,
	ND_BAD_VERSION = 17,
	ND_BAD_OPTIONS = 18,
	ND_UNSUPPORTED_PROTOCOL = 19,
	ND_INNER_NOT_IPV4 = 20,
	ND_INNER_TRUNCATED = 21,
	ND_INNER_BAD_CHECKSUM = 22,
	ND_REASON_COUNT = 23,
};

struct nd_config {
	__be32 underlay;	/* outer source; GENEVE to it is ours */
	__u32 underlay_ifindex;
	__u32 vni;
	__u32 active_table;	/* 0 or 1: the nd_maglev entry in use */
};

struct nd_proxy {
	__be32 addr;
	__u32 flags;	/* ND_PROXY_UP: new flows may take it, pinned flows stay */
	__u32 gen;	/* bumped when the slot changes hands or address */
	__u32 pad;
};

/* By host veth ifindex: what encapsulation needs. */
struct nd_sandbox {
	struct gnv_prefix prefix;	/* header_for(vni, job option) */
	__be32 ip;
	__u32 pad;
};

/* By sandbox IP: what the return path needs. */
struct nd_sandbox_ip {
	__u32 ifindex;	/* the host veth: bpf_redirect_peer lands in the sandbox */
	__u8 mac[ETH_ALEN];	/* the sandbox's */
	__u8 gw_mac[ETH_ALEN];	/* the host veth's, the sandbox's gateway */
	__u8 job_id[16];
};

struct nd_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct nd_flow {
	__u32 slot;
	__u32 gen;
};

struct nd_maglev {
	__u32 slots[ND_MAGLEV_SIZE];
};

struct nd_stats {
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 rx_bytes;
};

struct nd_count {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nd_config);
} nd_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ND_MAX_PROXIES);
	__type(key, __u32);
	__type(value, struct nd_proxy);
} nd_proxies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ND_MAX_PROXIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, __u32);
} nd_proxy_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct nd_maglev);
} nd_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ND_MAX_FLOWS);
	__type(key, struct nd_flow_key);
	__type(value, struct nd_flow);
} nd_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ND_MAX_SANDBOXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct nd_sandbox);
} nd_sandboxes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ND_MAX_SANDBOXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __be32);
	__type(value, struct nd_sandbox_ip);
} nd_sandbox_ips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ND_MAX_PROXIES);
	__type(key, __u32);
	__type(value, struct nd_stats);
} nd_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ND_REASON_COUNT);
	__type(key, __u32);
	__type(value, struct nd_count);
} nd_drops SEC(".maps");

static __always_inline int nd_drop(struct __sk_buff *skb, __u32 reason)
{
	struct nd_count *c = bpf_map_lookup_elem(&nd_drops, &reason);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
	return TC_ACT_SHOT;
}

static __always_inline struct nd_proxy *nd_live(__u32 slot, __u32 gen)
{
	struct nd_proxy *p = bpf_map_lookup_elem(&nd_proxies, &slot);

	if (!p || !(p->flags & ND_PROXY_UP) || p->gen != gen || !p->addr)
		return 0;
	return p;
}

static __always_inline int nd_same_job(const __u8 *a, const __u8 *b)
{
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < 16; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/* The proxy of this flow: its pinned one while that is up, else a fresh pick. */
static __always_inline struct nd_proxy *nd_pick(struct nd_config *cfg, struct nd_flow_key *key,
						__u32 hash, __u32 *slot_out)
{
	struct nd_flow *pinned = bpf_map_lookup_elem(&nd_flows, key);

	if (pinned) {
		struct nd_proxy *p = nd_live(pinned->slot, pinned->gen);

		if (p) {
			*slot_out = pinned->slot;
			return p;
		}
	}
	__u32 table = cfg->active_table & 1;
	struct nd_maglev *mg = bpf_map_lookup_elem(&nd_maglev, &table);

	if (!mg)
		return 0;
	__u32 idx = hash % ND_MAGLEV_SIZE;

	/* The verifier cannot bound a modulo; hide it from the compiler so the check stays. */
	asm volatile("" : "+r"(idx));
	if (idx >= ND_MAGLEV_SIZE)
		return 0;
	__u32 slot = mg->slots[idx];

	if (slot >= ND_MAX_PROXIES)
		return 0;
	struct nd_proxy *p = bpf_map_lookup_elem(&nd_proxies, &slot);

	if (!p || !(p->flags & ND_PROXY_UP) || !p->addr)
		return 0;
	struct nd_flow flow = { .slot = slot, .gen = p->gen };

	bpf_map_update_elem(&nd_flows, key, &flow, BPF_ANY);
	*slot_out = slot;
	return p;
}

SEC("tc")
int node_encap(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct nd_config *cfg = bpf_map_lookup_elem(&nd_config, &zero);

	if (!cfg || !cfg->underlay || !cfg->underlay_ifindex)
		return nd_drop(skb, ND_NOT_CONFIGURED);
	__u32 ifindex = skb->ingress_ifindex;
	struct nd_sandbox *sb = bpf_map_lookup_elem(&nd_sandboxes, &ifindex);

	if (!sb)
		return nd_drop(skb, ND_NO_SANDBOX);

	/* Tier 1 checked Ethernet + a 20-byte IPv4 header (+ TCP/UDP) and pulled them. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end || ip->ihl != 5)
		return nd_drop(skb, ND_MALFORMED);
	struct nd_flow_key key = {
		.saddr = ip->saddr, .daddr = ip->daddr, .proto = ip->protocol,
	};

	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
		__be16 *ports = (void *)(ip + 1);

		if ((void *)(ports + 2) > data_end)
			return nd_drop(skb, ND_MALFORMED);
		key.sport = ports[0];
		key.dport = ports[1];
	}
	__u32 hash = gnv_flow_hash(key.saddr, key.daddr, key.proto, key.sport, key.dport);
	__u32 slot = 0;
	struct nd_proxy *proxy = nd_pick(cfg, &key, hash, &slot);

	if (!proxy)
		return nd_drop(skb, ND_NO_HEALTHY_PROXY);
	__be32 daddr = proxy->addr;
	__u64 len = skb->len;

	if (len - ETH_HLEN + GNV_ENCAP_LEN > 0xffff)
		return nd_drop(skb, ND_TOO_BIG);
	if (gnv_encap(skb, ETH_HLEN, cfg->underlay, daddr, gnv_source_port(hash), &sb->prefix) < 0)
		return nd_drop(skb, ND_ENCAP_FAILED);
	struct nd_stats *st = bpf_map_lookup_elem(&nd_stats, &slot);

	if (st) {
		st->tx_packets += 1;
		st->tx_bytes += len - ETH_HLEN;
	}
	return bpf_redirect_neigh(cfg->underlay_ifindex, 0, 0, 0);
}

SEC("tc")
int node_underlay_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct nd_config *cfg = bpf_map_lookup_elem(&nd_config, &zero);

	if (!cfg || !cfg->underlay)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	/* Only IPv4 with a readable fixed header can be ours; the kernel judges the rest. */
	if ((void *)(ip + 1) > data_end) {
		if (skb->len < ETH_HLEN + sizeof(*ip) + sizeof(struct udphdr))
			return TC_ACT_OK;
		bpf_skb_pull_data(skb, ETH_HLEN + sizeof(*ip) + sizeof(struct udphdr));
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_OK;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_UDP ||
	    ip->daddr != cfg->underlay)
		return TC_ACT_OK;
	/* Non-first fragments carry no UDP header; the first one is judged below. */
	if (ip->frag_off & bpf_htons(GNV_IP_OFFSET))
		return TC_ACT_OK;
	__u32 ihl = ip->ihl * 4;
	struct udphdr udp;

	if (ihl < sizeof(*ip) || bpf_skb_load_bytes(skb, ETH_HLEN + ihl, &udp, sizeof(udp)) < 0)
		return TC_ACT_OK;
	if (udp.dest != bpf_htons(GNV_PORT))
		return TC_ACT_OK;

	/* GENEVE to this node: from here on, every outcome but the redirect is a drop. */
	__be32 saddr = ip->saddr;
	__u32 *slot = bpf_map_lookup_elem(&nd_proxy_addrs, &saddr);

	if (!slot)
		return nd_drop(skb, ND_UNKNOWN_PROXY);
	__u32 proxy_slot = *slot;
	struct gnv_rx rx = {};
	int res = gnv_parse(skb, ETH_HLEN, &rx);

	if (res != GNV_OK) {
		__u32 reason = ND_OUTER_MALFORMED - GNV_OUTER_MALFORMED + res;

		return nd_drop(skb, reason < ND_REASON_COUNT ? reason : ND_MALFORMED);
	}
	if (rx.vni != cfg->vni)
		return nd_drop(skb, ND_UNKNOWN_VNI);
	__be32 inner_daddr = rx.inner_daddr;
	struct nd_sandbox_ip *sb = bpf_map_lookup_elem(&nd_sandbox_ips, &inner_daddr);

	if (!sb)
		return nd_drop(skb, ND_UNKNOWN_SANDBOX);
	if (!nd_same_job(sb->job_id, rx.job_id))
		return nd_drop(skb, ND_JOB_MISMATCH);
	__u32 target = sb->ifindex;
	struct {
		__u8 dst[ETH_ALEN];
		__u8 src[ETH_ALEN];
	} macs;

	__builtin_memcpy(macs.dst, sb->mac, ETH_ALEN);
	__builtin_memcpy(macs.src, sb->gw_mac, ETH_ALEN);
	__u64 inner_len = skb->len - ETH_HLEN - GNV_ENCAP_LEN;

	if (gnv_decap(skb) < 0 || bpf_skb_store_bytes(skb, 0, &macs, sizeof(macs), 0) < 0)
		return nd_drop(skb, ND_DECAP_FAILED);
	struct nd_stats *st = bpf_map_lookup_elem(&nd_stats, &proxy_slot);

	if (st) {
		st->rx_packets += 1;
		st->rx_bytes += inner_len;
	}
	return bpf_redirect_peer(target, 0);
}

char LICENSE[] SEC("license") = "Apache-2.0";
