/* Reading a sock_ops context: addresses in the 16-byte form, ports in host order. */
#ifndef AIMESH_LIB_SOCKOPS_H
#define AIMESH_LIB_SOCKOPS_H

/* local and remote address of a sock_ops socket, 16-byte form; one load per field (verifier) */
static __always_inline void sockops_addrs(struct bpf_sock_ops *skops, __u8 *local, __u8 *remote)
{
	union addr16 a;
	if (skops->family == 2 /* AF_INET */) {
		__u32 l4 = skops->local_ip4;
		barrier_var(l4);
		__u32 r4 = skops->remote_ip4;
		barrier_var(r4);
		addr_from_v4(local, l4);
		addr_from_v4(remote, r4);
		return;
	}
	a.w[0] = skops->local_ip6[0];
	barrier_var(a.w[0]);
	a.w[1] = skops->local_ip6[1];
	barrier_var(a.w[1]);
	a.w[2] = skops->local_ip6[2];
	barrier_var(a.w[2]);
	a.w[3] = skops->local_ip6[3];
	barrier_var(a.w[3]);
	__builtin_memcpy(local, a.b, 16);
	a.w[0] = skops->remote_ip6[0];
	barrier_var(a.w[0]);
	a.w[1] = skops->remote_ip6[1];
	barrier_var(a.w[1]);
	a.w[2] = skops->remote_ip6[2];
	barrier_var(a.w[2]);
	a.w[3] = skops->remote_ip6[3];
	barrier_var(a.w[3]);
	__builtin_memcpy(remote, a.b, 16);
}

static __always_inline __u16 sockops_remote_port(struct bpf_sock_ops *skops)
{
	return (__u16)bpf_ntohl(skops->remote_port);
}

#endif
