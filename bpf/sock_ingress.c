/* cgroup_skb ingress: a packet from a remote source to a local server is judged on (remote identity, server
 * identity). Only new TCP connections (SYN without ACK) and UDP datagrams are judged; local sources were already
 * judged at connect time. Returning 0 drops the packet.
 *   reads:  runtime_config, local_address, dns_resolver, local_endpoint_identity, endpoint_identity, cgroup_identity, cgroup_inherit,
 *           identity_info, policy_verdict
 *   Also counts received UDP bytes into udp_flows (the client socket's entry for this remote address), and
 *   records in udp_reply that this remote or local address:port wrote to the receiving socket and was let in (a
 *   local sender was judged at its sendmsg/connect), which makes the socket's datagrams back to it replies.
 *   writes: verdict_counters, decision_counts, decision_events, udp_flows, udp_reply
 */
#include "programs.h"

#define LOOPBACK_IFINDEX 1   /* the loopback device's index in every network namespace */

struct ingress_tuple {
	__u8  saddr[16];
	__u8  daddr[16];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  is_v6;
	__u32 l4;         /* offset of the transport header */
};

/* Returns 1 when the packet is one to judge. */
static __always_inline int parse(struct __sk_buff *skb, struct ingress_tuple *t)
{
	__u32 l4;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 0;
		if (ip.frag_off & bpf_htons(0x1fff))
			return 0;   /* non-first fragment: no ports */
		addr_from_v4(t->saddr, ip.saddr);
		addr_from_v4(t->daddr, ip.daddr);
		t->proto = ip.protocol;
		t->is_v6 = 0;
		l4 = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 0;
		__builtin_memcpy(t->saddr, &ip6.saddr, 16);
		__builtin_memcpy(t->daddr, &ip6.daddr, 16);
		t->proto = ip6.nexthdr;   /* extension headers are not followed */
		t->is_v6 = 1;
		l4 = sizeof(ip6);
	} else {
		return 0;
	}
	t->l4 = l4;
	if (t->proto == IPPROTO_TCP) {
		struct tcphdr th;
		if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)))
			return 0;
		if (!th.syn || th.ack)
			return 0;
		t->sport = bpf_ntohs(th.source);
		t->dport = bpf_ntohs(th.dest);
		return 1;
	}
	if (t->proto == IPPROTO_UDP) {
		struct udphdr uh;
		if (bpf_skb_load_bytes(skb, l4, &uh, sizeof(uh)))
			return 0;
		t->sport = bpf_ntohs(uh.source);
		t->dport = bpf_ntohs(uh.dest);
		return 1;
	}
	return 0;
}

/* The receiving socket (cgroup_skb runs with skb->sk set to it) may answer this peer: see is_udp_reply. */
static __always_inline void udp_reply_allow(struct __sk_buff *skb, const struct ingress_tuple *t, __u32 peer_id)
{
	struct socket_peer_key k = { .cookie = bpf_get_socket_cookie(skb), .port = t->sport };
	if (!k.cookie)
		return;
	__builtin_memcpy(k.addr, t->saddr, 16);
	__u32 *id = udp_reply.lookup(&k);
	if (id && *id == peer_id)
		return;
	udp_reply.update(&k, &peer_id);   /* LRU: a full map evicts the oldest reply path, never a verdict */
}

int aimesh_ingress(struct __sk_buff *skb)
{
	if (skb_surely_uninteresting(skb, 1))
		return 1;
	const struct runtime_config *cfg = config_get();
	if (!cfg)
		return 1;
	struct ingress_tuple t = {};
	if (!parse(skb, &t))
		return 1;
	if (t.proto == IPPROTO_UDP)
		udp_account(skb, t.saddr, t.sport, skb->len - t.l4 - sizeof(struct udphdr), 0);
	if (addr_is_local(t.saddr)) {
		if (t.proto == IPPROTO_UDP)
			udp_reply_allow(skb, &t, ID_NONE);   /* judged at the sender's sendmsg/connect */
		return 1;
	}
	/* In on loopback: from this host, at an address the agent has not listed yet (added since it last looked;
	 * counted, and the agent rescans). To an exact address:port bind the sender's connect/sendmsg was judged
	 * against that bind's identity (the same lookup, and a governed bind entry is written by post_bind, not by the
	 * agent): let it in like any local source. To a wildcard bind the sender judged the address as remote: judge
	 * it as from world below (fails closed). */
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX) {
		if (local_endpoint_lookup(t.daddr, t.dport, t.proto, 0) != ID_NONE) {
			counter_add(COUNTER_INGRESS_UNLISTED_EXACT);
			if (t.proto == IPPROTO_UDP)
				udp_reply_allow(skb, &t, ID_NONE);
			return 1;
		}
		counter_add(COUNTER_INGRESS_UNLISTED_JUDGED);
	}

	__u8 gen = cfg->active_gen;
	__u64 cg = bpf_skb_cgroup_id(skb);
	__u32 dst = local_endpoint_lookup(t.daddr, t.dport, t.proto, 1);
	if (dst == ID_NONE)
		dst = skb_cgroup_identity(skb);
	__u32 src = endpoint_lookup(gen, t.saddr, 0);
	if (src == ID_NONE)
		src = ID_WORLD;

	struct decision d = {};
	decide(&d, cfg, src, dst, t.daddr, t.dport, t.proto);
	if (d.reason == REASON_SUNSET)
		d.verdict = deny_or_audit(identity_flags(dst, gen) & ID_F_ENFORCE);
	counter_add(COUNTER_DECISION(HOOK_INGRESS, d.verdict));

	/* TCP: one event per connection attempt; UDP: only what was not plainly allowed. */
	if (t.proto == IPPROTO_TCP || d.verdict != VERDICT_ALLOWED)
		decision_count(src, dst, HOOK_INGRESS, d.verdict, d.flags);
	if ((t.proto == IPPROTO_TCP || d.verdict != VERDICT_ALLOWED) && decision_event_wanted(cfg, d.verdict)) {
		struct decision_event *ev = decision_reserve();
		if (ev) {
			__builtin_memset(ev, 0, sizeof(*ev));
			ev->ts_ns = bpf_ktime_get_ns();
			ev->cgroup_id = cg;
			__builtin_memcpy(ev->dialed_addr, t.daddr, 16);
			__builtin_memcpy(ev->actual_addr, t.daddr, 16);
			__builtin_memcpy(ev->peer_addr, t.saddr, 16);
			ev->src_id = src;
			ev->dst_id = dst;
			ev->actual_dst_id = dst;
			ev->rule_id = d.rule_id;
			ev->dialed_port = t.dport;
			ev->actual_port = t.dport;
			ev->peer_port = t.sport;
			ev->is_v6 = t.is_v6;
			ev->proto = t.proto;
			ev->hook = HOOK_INGRESS;
			ev->verdict = d.verdict;
			ev->reason = d.reason;
			ev->flags = d.flags;
			decision_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
		}
	}
	if (t.proto == IPPROTO_UDP && d.verdict != VERDICT_DENIED)
		udp_reply_allow(skb, &t, src);
	return d.verdict != VERDICT_DENIED;
}
