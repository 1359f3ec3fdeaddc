/* Who is who: the identity of the calling workload, of a destination address, and of a local server. */
#ifndef AIMESH_LIB_IDENTITY_H
#define AIMESH_LIB_IDENTITY_H

/* The calling process first (process selectors are more specific), then the cgroup cg. */
static __always_inline __u32 workload_identity(__u64 cg)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 *id = process_identity.lookup(&tgid);
	if (id)
		return *id;
	id = cgroup_identity.lookup(&cg);
	if (id)
		return *id;
	return ID_UNMANAGED;
}

static __always_inline __u32 current_identity(void)
{
	return workload_identity(bpf_get_current_cgroup_id());
}

/* The cgroup a socket was created in (bpf/sock_create.c), else the caller's (a socket made before the datapath was
 * attached). A process that wrote itself into another cgroup's cgroup.procs keeps, for the sockets it opened before,
 * the identity of the cgroup it opened them in: the kernel charges those sockets there too. */
static __always_inline __u64 socket_cgroup_id(struct bpf_sock *sk)
{
	if (sk) {
		__u64 *cg = socket_cgroup.sk_storage_get(sk, 0, 0);
		if (cg)
			return *cg;
	}
	return bpf_get_current_cgroup_id();
}

/* A remote endpoint from the config: port-specific entries win over any-port ones. */
static __always_inline __u32 endpoint_lookup(__u8 gen, const __u8 *addr, __u16 port)
{
	struct endpoint_key k = {};
	k.prefixlen = 32 + 128;
	k.gen = gen;
	k.port = port;
	__builtin_memcpy(k.addr, addr, 16);
	__u32 *id;
	if (port) {
		id = endpoint_identity.lookup(&k);
		if (id)
			return *id;
		k.port = 0;
	}
	id = endpoint_identity.lookup(&k);
	return id ? *id : ID_NONE;
}

/* A local server: the exact bound address, then a wildcard bind when the address is this host's. */
static __always_inline __u32 local_endpoint_lookup(const __u8 *addr, __u16 port, __u8 proto, int is_local)
{
	struct local_endpoint_key k = {};
	__builtin_memcpy(k.addr, addr, 16);
	k.port = port;
	k.proto = proto;
	__u32 *id = local_endpoint_identity.lookup(&k);
	if (id)
		return *id;
	if (!is_local)
		return ID_NONE;
	/* 0.0.0.0 binds are stored v4-mapped, :: binds as all-zero. */
	if (addr_is_v4(addr))
		addr_from_v4(k.addr, 0);
	else
		__builtin_memset(k.addr, 0, 16);
	id = local_endpoint_identity.lookup(&k);
	if (id)
		return *id;
	if (addr_is_v4(addr)) {
		/* a dual-stack "::" bind also takes IPv4 */
		__builtin_memset(k.addr, 0, 16);
		id = local_endpoint_identity.lookup(&k);
		if (id)
			return *id;
	}
	return ID_NONE;
}

/* The identity a connection to addr:port reaches. */
static __always_inline __u32 destination_identity(__u8 gen, const __u8 *addr, __u16 port, __u8 proto)
{
	int is_local = addr_is_local(addr);
	__u32 id = local_endpoint_lookup(addr, port, proto, is_local);
	if (id != ID_NONE)
		return id;
	id = endpoint_lookup(gen, addr, port);
	if (id != ID_NONE)
		return id;
	return is_local ? ID_UNMANAGED : ID_WORLD;
}

#endif
