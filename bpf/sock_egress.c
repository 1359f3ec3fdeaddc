/* cgroup_skb egress: counts the UDP bytes and packets a governed socket sends into its udp_flows entry
 * (TCP is counted by sock_ops from the socket itself), and judges every packet of a raw socket (SOCK_RAW, AF_INET or
 * AF_INET6, with or without IP_HDRINCL): those never pass connect or sendmsg, so this is their only verdict. A denied
 * raw packet is dropped (returns 0), counted and recorded (HOOK_EGRESS, REASON_RAW_SOCKET).
 * AF_PACKET sockets never reach this program (nor any cgroup hook): see README "What a cgroup identity proves".
 *   reads:  runtime_config, cgroup_identity, local_address, local_endpoint_identity, endpoint_identity, identity_info,
 *           policy_verdict, dns_resolver
 *   writes: udp_flows, verdict_counters, decision_events
 */
#include "programs.h"

#define AIMESH_SOCK_RAW 3

struct raw_tuple {
	__u8  daddr[16];
	__u8  saddr[16];
	__u16 dport;      /* 0: no transport header to read (not TCP/UDP, or a non-first fragment) */
	__u16 sport;
	__u8  proto;
	__u8  is_v6;
};

/* The headers as the receiver will read them (IP_HDRINCL: the caller wrote them). Returns 0 when unreadable. */
static __always_inline int raw_parse(struct __sk_buff *skb, struct raw_tuple *t)
{
	__u32 l4;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 0;
		addr_from_v4(t->daddr, ip.daddr);
		addr_from_v4(t->saddr, ip.saddr);
		t->proto = ip.protocol;
		if (ip.frag_off & bpf_htons(0x1fff))
			return 1;   /* non-first fragment: no ports, judged on port 0 (only an any-port policy allows it) */
		l4 = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 0;
		__builtin_memcpy(t->daddr, &ip6.daddr, 16);
		__builtin_memcpy(t->saddr, &ip6.saddr, 16);
		t->proto = ip6.nexthdr;   /* an extension header is judged as its own protocol: no policy allows it */
		t->is_v6 = 1;
		l4 = sizeof(ip6);
	} else {
		return 0;
	}
	if (t->proto == IPPROTO_TCP || t->proto == IPPROTO_UDP) {
		__u16 ports[2];   /* source, destination: the first four bytes of both headers */
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return 0;
		t->sport = bpf_ntohs(ports[0]);
		t->dport = bpf_ntohs(ports[1]);
	}
	return 1;
}

/* One raw-socket packet: 1 lets it go, 0 drops it. Judged as the identity of the socket's cgroup (fixed when the
 * socket was made); an unreadable packet from a governed identity is dropped. */
static __always_inline int raw_judge(struct __sk_buff *skb)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg)
		return 1;
	__u8 gen = cfg->active_gen;
	__u64 cg = bpf_skb_cgroup_id(skb);
	__u32 *idp = cgroup_identity.lookup(&cg);
	__u32 src = idp ? *idp : ID_UNMANAGED;
	struct raw_tuple t = {};
	struct decision d = {};
	__u32 dst = ID_NONE;
	if (!raw_parse(skb, &t)) {
		if (!(identity_flags_cfg(src, gen, cfg->flags) & ID_F_GOVERNED)) {
			counter_add(COUNTER_RAW_PASSED);
			return 1;
		}
		d.verdict = VERDICT_DENIED;
		d.reason = REASON_RAW_SOCKET;
	} else {
		dst = destination_identity(gen, t.daddr, t.dport, t.proto);
		decide(&d, cfg, src, dst, t.daddr, t.dport, t.proto);
		if (d.reason == REASON_SUNSET)
			d.verdict = deny_or_audit(identity_flags(dst, gen) & ID_F_ENFORCE);
	}
	if (d.verdict == VERDICT_ALLOWED) {
		counter_add(COUNTER_RAW_PASSED);
		return 1;
	}
	counter_add(d.verdict == VERDICT_DENIED ? COUNTER_RAW_DENIED : COUNTER_RAW_PASSED);
	d.reason = REASON_RAW_SOCKET;
	/* not in decision_counts (aimesh_connections counts connections; this is per packet): COUNTER_RAW_* */
	struct decision_event *ev = decision_reserve();
	if (ev) {
		__builtin_memset(ev, 0, sizeof(*ev));
		ev->ts_ns = bpf_ktime_get_ns();
		ev->cgroup_id = cg;
		ev->cookie = bpf_get_socket_cookie(skb);
		__builtin_memcpy(ev->dialed_addr, t.daddr, 16);
		__builtin_memcpy(ev->actual_addr, t.daddr, 16);
		__builtin_memcpy(ev->peer_addr, t.saddr, 16);   /* the source the packet claims (IP_HDRINCL: any) */
		ev->src_id = src;
		ev->dst_id = dst;
		ev->actual_dst_id = dst;
		ev->dialed_port = t.dport;
		ev->actual_port = t.dport;
		ev->peer_port = t.sport;
		ev->is_v6 = t.is_v6;
		ev->proto = t.proto;
		ev->hook = HOOK_EGRESS;
		ev->verdict = d.verdict;
		ev->reason = d.reason;
		ev->flags = d.flags;
		decision_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	}
	return d.verdict != VERDICT_DENIED;
}

static __always_inline int from_raw_socket(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	return sk && sk->type == AIMESH_SOCK_RAW;
}

int aimesh_egress(struct __sk_buff *skb)
{
	if (from_raw_socket(skb))
		return raw_judge(skb);
	if (skb_surely_uninteresting(skb, 0))
		return 1;
	__u8 daddr[16];
	__u16 dport;
	__u32 hdrs;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) || ip.protocol != IPPROTO_UDP)
			return 1;
		struct udphdr uh;
		if (bpf_skb_load_bytes(skb, ip.ihl * 4, &uh, sizeof(uh)))
			return 1;
		addr_from_v4(daddr, ip.daddr);
		dport = bpf_ntohs(uh.dest);
		hdrs = ip.ihl * 4 + sizeof(uh);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) || ip6.nexthdr != IPPROTO_UDP)
			return 1;
		struct udphdr uh;
		if (bpf_skb_load_bytes(skb, sizeof(ip6), &uh, sizeof(uh)))
			return 1;
		__builtin_memcpy(daddr, &ip6.daddr, 16);
		dport = bpf_ntohs(uh.dest);
		hdrs = sizeof(ip6) + sizeof(uh);
	} else {
		return 1;
	}
	udp_account(skb, daddr, dport, skb->len - hdrs, 1);   /* payload bytes, as for TCP */
	return 1;
}
