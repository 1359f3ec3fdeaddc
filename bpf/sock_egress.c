/* cgroup_skb egress: counts the UDP bytes and packets a governed socket sends into its udp_flows entry
 * (TCP is counted by sock_ops from the socket itself). Never drops: returns 1.
 *   writes: udp_flows
 */
#include "programs.h"

int aimesh_egress(struct __sk_buff *skb)
{
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
