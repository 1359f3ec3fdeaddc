/* cgroup post_bind4/6: a workload with an identity that binds a port makes that address:port an endpoint of its
 * identity, so local model servers need no `endpoints:` entry.
 *   reads:  process_identity, cgroup_identity, cgroup_inherit
 *   A bind by a workload without identity removes a stale entry for that address:port.
 *   When local_endpoint_identity is full, a workload with an identity cannot bind (EPERM, counted): its port would
 *   otherwise look unmanaged and be open to whoever may reach unmanaged servers.
 *   writes: local_endpoint_identity, verdict_counters (when full)
 */
#include "programs.h"

static __always_inline int record_bind(struct bpf_sock *sk, const __u8 *addr)
{
	__u32 id = current_identity();
	struct local_endpoint_key k = {};
	__builtin_memcpy(k.addr, addr, 16);
	k.port = sk->src_port;
	k.proto = sk->protocol;
	if (id == ID_UNMANAGED) {
		/* whoever had this port before is gone: its identity must not stick to the new owner */
		local_endpoint_identity.delete(&k);
		return 1;
	}
	if (local_endpoint_identity.update(&k, &id)) {
		counter_add(COUNTER_LOCAL_ENDPOINTS_FULL);
		return 0;   /* fail closed: the bind fails with EPERM */
	}
	return 1;
}

int aimesh_post_bind4(struct bpf_sock *sk)
{
	__u8 addr[16];
	addr_from_v4(addr, sk->src_ip4);
	return record_bind(sk, addr);
}

int aimesh_post_bind6(struct bpf_sock *sk)
{
	__u8 addr[16];
	ADDR_LOAD_V6(addr, sk->src_ip6);
	return record_bind(sk, addr);
}
