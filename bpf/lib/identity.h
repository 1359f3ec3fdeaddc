/* Who is who: the identity of the calling workload, of a destination address, and of a local server. */
#ifndef AIMESH_LIB_IDENTITY_H
#define AIMESH_LIB_IDENTITY_H

/* A cgroup the agent has not classified yet (made a moment ago: the agent classifies on the cgroup_mkdir event) takes
 * the identity of an ancestor in cgroup_inherit: the agent writes an ancestor there only when every cgroup below it
 * matches that identity's selectors first (agent/identity/assigner.py inherit_identity), so the child's own entry,
 * when it comes, says the same. No such ancestor: unmanaged, as before. Deeper than CGROUP_WALK_LEVELS: not walked
 * (fails closed). ancestor(level) is 0 above the cgroup's own level. The walk is of the caller's cgroup: a socket
 * created in another cgroup (its process moved since, bpf/sock_create.c) is judged by that cgroup's own entry. */
#define CGROUP_WALK_LEVELS 16

static __always_inline __u32 cgroup_identity_of(__u64 cg)
{
	__u32 *id = cgroup_identity.lookup(&cg);
	if (id)
		return *id;
	if (cg != bpf_get_current_cgroup_id())
		return ID_UNMANAGED;
#pragma unroll
	for (int lvl = CGROUP_WALK_LEVELS; lvl >= 1; lvl--) {
		__u64 a = bpf_get_current_ancestor_cgroup_id(lvl);
		if (!a || a == cg)
			continue;
		id = cgroup_inherit.lookup(&a);
		if (id)
			return *id;
	}
	return ID_UNMANAGED;
}

static __always_inline __u32 current_cgroup_identity(void)
{
	return cgroup_identity_of(bpf_get_current_cgroup_id());
}

/* The same for the socket of an skb (cgroup_skb programs: the sender's or receiver's cgroup, not current's). */
static __always_inline __u32 skb_cgroup_identity(struct __sk_buff *skb)
{
	__u64 cg = bpf_skb_cgroup_id(skb);
	__u32 *id = cgroup_identity.lookup(&cg);
	if (id)
		return *id;
#pragma unroll
	for (int lvl = CGROUP_WALK_LEVELS; lvl >= 1; lvl--) {
		__u64 a = bpf_skb_ancestor_cgroup_id(skb, lvl);
		if (!a || a == cg)
			continue;
		id = cgroup_inherit.lookup(&a);
		if (id)
			return *id;
	}
	return ID_UNMANAGED;
}

/* The calling process first (process selectors are more specific), then the cgroup cg. */
static __always_inline __u32 workload_identity(__u64 cg)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 *id = process_identity.lookup(&tgid);
	if (id)
		return *id;
	return cgroup_identity_of(cg);
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
