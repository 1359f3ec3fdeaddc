/* Address helpers: 16-byte v4-mapped form, loopback and local-address tests. */
#ifndef AIMESH_LIB_ADDR_H
#define AIMESH_LIB_ADDR_H

/* Keep the compiler from merging field loads of a context or socket pointer into pointer arithmetic. */
#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

union addr16 {
	__u8  b[16];
	__u32 w[4];
};

/* Copy a context's __u32 field[4] IPv6 address into dst (16 bytes): four separate loads, since the verifier refuses
 * the merged or pointer-arithmetic access the compiler would otherwise make on sock and sk_msg contexts. */
#define ADDR_LOAD_V6(dst, field)                      \
	do {                                          \
		union addr16 __a;                     \
		__a.w[0] = (field)[0];                \
		barrier_var(__a.w[0]);                \
		__a.w[1] = (field)[1];                \
		barrier_var(__a.w[1]);                \
		__a.w[2] = (field)[2];                \
		barrier_var(__a.w[2]);                \
		__a.w[3] = (field)[3];                \
		barrier_var(__a.w[3]);                \
		__builtin_memcpy((dst), __a.b, 16);   \
	} while (0)

/* The same for a __u32 IPv4 field, into the v4-mapped form. */
#define ADDR_LOAD_V4(dst, field)                      \
	do {                                          \
		__u32 __v4 = (field);                 \
		barrier_var(__v4);                    \
		addr_from_v4((dst), __v4);            \
	} while (0)

static __always_inline void addr_from_v4(__u8 *dst, __u32 ip4_be)
{
	union addr16 a = {};
	a.w[2] = bpf_htonl(0x0000ffff);
	a.w[3] = ip4_be;
	__builtin_memcpy(dst, a.b, 16);
}

static __always_inline int addr_is_v4(const __u8 *addr)
{
	union addr16 a;
	__builtin_memcpy(a.b, addr, 16);
	return a.w[0] == 0 && a.w[1] == 0 && a.w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline __u32 addr_v4(const __u8 *addr)
{
	union addr16 a;
	__builtin_memcpy(a.b, addr, 16);
	return a.w[3];
}

static __always_inline int addr_is_zero(const __u8 *addr)
{
	union addr16 a;
	__builtin_memcpy(a.b, addr, 16);
	return (a.w[0] | a.w[1] | a.w[2] | a.w[3]) == 0;
}

static __always_inline int addr_equal(const __u8 *x, const __u8 *y)
{
	union addr16 a, b;
	__builtin_memcpy(a.b, x, 16);
	__builtin_memcpy(b.b, y, 16);
	return ((a.w[0] ^ b.w[0]) | (a.w[1] ^ b.w[1]) | (a.w[2] ^ b.w[2]) | (a.w[3] ^ b.w[3])) == 0;
}

/* Per-packet prefilter for the cgroup_skb programs, by direct packet access (cheaper than bpf_skb_load_bytes):
 * 1 when the packet surely needs no work — not UDP and not a TCP SYN without ACK. 0 means look closer (also when
 * the headers are not in the linear data). */
static __always_inline int skb_surely_uninteresting(struct __sk_buff *skb, int tcp_syn_matters)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 proto;
	void *l4;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data;
		if ((void *)(ip + 1) > end)
			return 0;
		proto = ip->protocol;
		l4 = data + ip->ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data;
		if ((void *)(ip6 + 1) > end)
			return 0;
		proto = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
	} else {
		return 1;
	}
	if (proto == IPPROTO_UDP)
		return 0;
	if (proto != IPPROTO_TCP || !tcp_syn_matters)
		return 1;
	struct tcphdr *th = l4;
	if ((void *)(th + 1) > end)
		return 0;
	return !(th->syn && !th->ack);
}

/* 127.0.0.0/8 (mapped) or ::1, or an address the agent listed in local_address. */
static __always_inline int addr_is_local(const __u8 *addr)
{
	union addr16 a;
	__builtin_memcpy(a.b, addr, 16);
	if (a.w[0] == 0 && a.w[1] == 0) {
		if (a.w[2] == bpf_htonl(0x0000ffff) && (bpf_ntohl(a.w[3]) >> 24) == 127)
			return 1;
		if (a.w[2] == 0 && a.w[3] == bpf_htonl(1))
			return 1;
	}
	struct local_endpoint_key k = {};
	__builtin_memcpy(k.addr, addr, 16);
	return local_address.lookup(&k) != NULL;
}

#endif
