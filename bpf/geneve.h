// SPDX-License-Identifier: Apache-2.0
/*
 * egressd GENEVE in tc: encapsulation, outer-header validation and
 * decapsulation, shared by the node (bpf/node.c) and the proxy programs.
 * The wire format is DESIGN.md's and egressd/geneve/codec.py's (the golden
 * bytes): outer IPv4 (20 bytes, no options, DF, TTL 64) + UDP to port 6081
 * (checksum 0, source port from the inner flow's hash, RFC 8926 3.3) + the
 * 36-byte GENEVE prefix (8-byte header, the 28-byte job option). The prefix is
 * constant per job: the agent writes `egressd.geneve.header_for(vni, job)`
 * into a map, and gnv_encap copies it, so C never re-derives the format.
 *
 * API (stable; include after the linux/ and bpf/ headers):
 *
 *   gnv_flow_hash(saddr, daddr, proto, sport, dport) -> __u32
 *       the inner flow's hash; mirrored by egressd.agent.node_maps.flow_hash.
 *   gnv_source_port(hash) -> __be16       49152 + hash % 16384
 *   gnv_encap(skb, l3_off, saddr, daddr, sport, prefix) -> 0 | < 0
 *       grows GNV_ENCAP_LEN bytes at l3_off (the device's MAC header length:
 *       ETH_HLEN on Ethernet, 0 on a TUN; BPF_ADJ_ROOM_MAC inserts there) and
 *       writes outer IPv4 + UDP + prefix. GSO super-packets stay GSO (the
 *       ENCAP flags mark them UDP-tunnel, FIXED_GSO keeps the inner MSS: the
 *       sandbox MTU leaves the 64 bytes). On failure the packet may be half
 *       changed: drop it.
 *   gnv_parse(skb, l3_off, &rx) -> GNV_OK or a GNV_* reason
 *       for a frame whose IPv4 header at l3_off carries UDP to GNV_PORT:
 *       checks what ip_rcv would (tc ingress runs before it: version, IHL =
 *       5, total length against the skb, header checksum, no fragment), the
 *       UDP length, the GENEVE header (version 0, protocol IPv4, exactly the
 *       job option, which is critical) and the inner IPv4 header (version,
 *       IHL, total length = what is left, header checksum); fills rx.
 *   gnv_decap(skb) -> 0 | < 0      removes GNV_ENCAP_LEN bytes after the MAC
 *       header (the caller rewrites or pushes L2 as its redirect needs).
 *
 * The outer UDP checksum is not verified: peers send 0 (RFC 8926 allows it
 * over IPv4) or, from a local UDP socket over veth, a partial one that only
 * the device would complete. The inner packet's own checksums are the
 * receiver's business, as after any decapsulation.
 */
#ifndef EGRESSD_GENEVE_H
#define EGRESSD_GENEVE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define GNV_PORT 6081
#define GNV_PREFIX_LEN 36 /* GENEVE header + job option */
#define GNV_OUTER_LEN 28  /* IPv4 + UDP */
#define GNV_ENCAP_LEN (GNV_OUTER_LEN + GNV_PREFIX_LEN)
#define GNV_OPT_CLASS 0xFF01
#define GNV_OPT_TYPE_JOB 0x81
#define GNV_OPTLEN_WORDS 7 /* the job option: 28 bytes */
#define GNV_FLAG_CRITICAL 0x40
#define GNV_TTL 64
#define GNV_IP_DF 0x4000
#define GNV_IP_MF 0x2000
#define GNV_IP_OFFSET 0x1fff
#define GNV_SPORT_MIN 49152
#define GNV_SPORT_SPAN 16384
/* <linux/bpf.h> of older distributions lacks it (kernel 6.3+). */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define GNV_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#else
#define GNV_F_ADJ_ROOM_DECAP_L3_IPV4 BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#endif

/* gnv_parse's results; the agent's reason table mirrors the names. */
enum gnv_result {
	GNV_OK = 0,
	GNV_OUTER_MALFORMED = 1,	/* truncated, bad version, length */
	GNV_OUTER_IP_OPTIONS = 2,
	GNV_OUTER_BAD_CHECKSUM = 3,
	GNV_OUTER_FRAGMENT = 4,
	GNV_UDP_MALFORMED = 5,
	GNV_TRUNCATED = 6,
	GNV_BAD_VERSION = 7,
	GNV_BAD_OPTIONS = 8,	/* anything but exactly the job option */
	GNV_UNSUPPORTED_PROTOCOL = 9,
	GNV_INNER_NOT_IPV4 = 10,
	GNV_INNER_TRUNCATED = 11,
	GNV_INNER_BAD_CHECKSUM = 12,
};

/* The 36-byte prefix as the agent writes it (byte for byte the codec's). */
struct gnv_prefix {
	__u8 bytes[GNV_PREFIX_LEN];
};

struct gnv_hdr {
	__u8 ver_optlen;
	__u8 flags;
	__be16 protocol;
	__be32 vni_rsvd;
	__be16 opt_class;
	__u8 opt_type;
	__u8 opt_len;
	__u8 job_id[16];
	__u8 digest[8];
} __attribute__((packed));

/* What gnv_parse read from a datagram. */
struct gnv_rx {
	__be32 outer_saddr;
	__be32 outer_daddr;
	__u32 vni;
	__be32 inner_saddr;
	__be32 inner_daddr;
	__u8 job_id[16];
	__u8 digest[8];
};

/* lowbias32: a bijection with full avalanche, cheap in eBPF. */
static __always_inline __u32 gnv_mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x7feb352dU;
	h ^= h >> 15;
	h *= 0x846ca68bU;
	h ^= h >> 16;
	return h;
}

/* Over host-order values, so that the Python mirror is byte-order free. */
static __always_inline __u32 gnv_flow_hash(__be32 saddr, __be32 daddr, __u8 proto, __be16 sport,
					   __be16 dport)
{
	__u32 h = gnv_mix(bpf_ntohl(saddr) ^ 0x9e3779b9U);

	h = gnv_mix(h ^ bpf_ntohl(daddr));
	h = gnv_mix(h ^ (((__u32)bpf_ntohs(sport) << 16) | bpf_ntohs(dport)));
	return gnv_mix(h ^ proto);
}

static __always_inline __be16 gnv_source_port(__u32 hash)
{
	return bpf_htons(GNV_SPORT_MIN + hash % GNV_SPORT_SPAN);
}

static __always_inline __u16 gnv_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The one's-complement sum of a 20-byte IPv4 header, folded (0xffff: it verifies). */
static __always_inline __u16 gnv_ip_sum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return gnv_fold(sum);
}

static __always_inline int gnv_encap(struct __sk_buff *skb, __u32 l3_off, __be32 saddr,
				     __be32 daddr, __be16 sport, const struct gnv_prefix *prefix)
{
	struct {
		struct iphdr ip;
		struct udphdr udp;
		struct gnv_prefix gnv;
	} hdr = {}; /* 20 + 8 + 36: no padding, checked below */
	__u32 inner_len = skb->len - l3_off;

	_Static_assert(sizeof(hdr) == GNV_ENCAP_LEN, "outer headers must be 64 bytes");
	if (inner_len + GNV_ENCAP_LEN > 0xffff)
		return -1;
	if (bpf_skb_adjust_room(skb, GNV_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP) < 0)
		return -1;
	hdr.ip.version = 4;
	hdr.ip.ihl = 5;
	hdr.ip.tot_len = bpf_htons(inner_len + GNV_ENCAP_LEN);
	hdr.ip.frag_off = bpf_htons(GNV_IP_DF);
	hdr.ip.ttl = GNV_TTL;
	hdr.ip.protocol = IPPROTO_UDP;
	hdr.ip.saddr = saddr;
	hdr.ip.daddr = daddr;
	hdr.ip.check = ~gnv_ip_sum(&hdr.ip);
	hdr.udp.source = sport;
	hdr.udp.dest = bpf_htons(GNV_PORT);
	hdr.udp.len = bpf_htons(inner_len + GNV_OUTER_LEN - sizeof(struct iphdr) + GNV_PREFIX_LEN);
	hdr.udp.check = 0;
	__builtin_memcpy(&hdr.gnv, prefix, sizeof(hdr.gnv));
	if (bpf_skb_store_bytes(skb, l3_off, &hdr, sizeof(hdr), 0) < 0)
		return -1;
	return 0;
}

static __always_inline int gnv_parse(struct __sk_buff *skb, __u32 l3_off, struct gnv_rx *rx)
{
	struct iphdr ip;
	struct udphdr udp;
	struct gnv_hdr gnv;
	struct iphdr inner;
	__u32 len = skb->len;

	if (l3_off > 64)
		return GNV_OUTER_MALFORMED;
	if (bpf_skb_load_bytes(skb, l3_off, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
	    ip.ihl < 5)
		return GNV_OUTER_MALFORMED;
	if (ip.ihl != 5)
		return GNV_OUTER_IP_OPTIONS;
	__u32 tot = bpf_ntohs(ip.tot_len);

	/* Ethernet may pad a short frame: the total length may be below the skb's. */
	if (tot < sizeof(ip) + sizeof(udp) || tot > len - l3_off)
		return GNV_OUTER_MALFORMED;
	if (gnv_ip_sum(&ip) != 0xffff)
		return GNV_OUTER_BAD_CHECKSUM;
	if (ip.frag_off & bpf_htons(GNV_IP_MF | GNV_IP_OFFSET))
		return GNV_OUTER_FRAGMENT;
	if (bpf_skb_load_bytes(skb, l3_off + sizeof(ip), &udp, sizeof(udp)) < 0 ||
	    bpf_ntohs(udp.len) != tot - sizeof(ip))
		return GNV_UDP_MALFORMED;
	if (tot < GNV_ENCAP_LEN ||
	    bpf_skb_load_bytes(skb, l3_off + GNV_OUTER_LEN, &gnv, sizeof(gnv)) < 0)
		return GNV_TRUNCATED;
	if (gnv.ver_optlen >> 6)
		return GNV_BAD_VERSION;
	if ((gnv.ver_optlen & 0x3f) != GNV_OPTLEN_WORDS || gnv.opt_class != bpf_htons(GNV_OPT_CLASS) ||
	    gnv.opt_type != GNV_OPT_TYPE_JOB || (gnv.opt_len & 0x1f) != 6 ||
	    !(gnv.flags & GNV_FLAG_CRITICAL))
		return GNV_BAD_OPTIONS;
	if (gnv.protocol != bpf_htons(ETH_P_IP))
		return GNV_UNSUPPORTED_PROTOCOL;
	__u32 inner_len = tot - GNV_ENCAP_LEN;

	if (inner_len < sizeof(inner) ||
	    bpf_skb_load_bytes(skb, l3_off + GNV_ENCAP_LEN, &inner, sizeof(inner)) < 0)
		return GNV_INNER_TRUNCATED;
	if (inner.version != 4 || inner.ihl < 5)
		return GNV_INNER_NOT_IPV4;
	if (bpf_ntohs(inner.tot_len) != inner_len || inner.ihl * 4 > inner_len)
		return GNV_INNER_TRUNCATED;
	/* Options would need a longer sum; no sandbox is sent any (tier 1 drops them). */
	if (inner.ihl != 5)
		return GNV_INNER_NOT_IPV4;
	if (gnv_ip_sum(&inner) != 0xffff)
		return GNV_INNER_BAD_CHECKSUM;
	rx->outer_saddr = ip.saddr;
	rx->outer_daddr = ip.daddr;
	rx->vni = bpf_ntohl(gnv.vni_rsvd) >> 8;
	rx->inner_saddr = inner.saddr;
	rx->inner_daddr = inner.daddr;
	__builtin_memcpy(rx->job_id, gnv.job_id, sizeof(rx->job_id));
	__builtin_memcpy(rx->digest, gnv.digest, sizeof(rx->digest));
	return GNV_OK;
}

static __always_inline int gnv_decap(struct __sk_buff *skb)
{
	return bpf_skb_adjust_room(skb, -GNV_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				   BPF_F_ADJ_ROOM_FIXED_GSO | GNV_F_ADJ_ROOM_DECAP_L3_IPV4);
}

#endif /* EGRESSD_GENEVE_H */
