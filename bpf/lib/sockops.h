/* Reading a sock_ops context: addresses in the 16-byte form, ports in host order. */
#ifndef AIMESH_LIB_SOCKOPS_H
#define AIMESH_LIB_SOCKOPS_H

/* local and remote address of a sock_ops socket, 16-byte form; one load per field (verifier) */
static __always_inline void sockops_addrs(struct bpf_sock_ops *skops, __u8 *local, __u8 *remote)
{
	if (skops->family == 2 /* AF_INET */) {
		ADDR_LOAD_V4(local, skops->local_ip4);
		ADDR_LOAD_V4(remote, skops->remote_ip4);
	} else {
		ADDR_LOAD_V6(local, skops->local_ip6);
		ADDR_LOAD_V6(remote, skops->remote_ip6);
	}
}

static __always_inline __u16 sockops_remote_port(struct bpf_sock_ops *skops)
{
	return (__u16)bpf_ntohl(skops->remote_port);
}

#endif
