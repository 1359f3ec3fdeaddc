/* cgroup post_bind4/6 and sock_release: a workload with an identity that binds a port makes that address:port an
 * endpoint of its identity, so local model servers need no `endpoints:` entry.
 *   reads:  process_identity, cgroup_identity, cgroup_inherit
 *   writes: local_endpoint_identity, local_endpoint_refs, bound_port, verdict_counters
 * Who holds a port (local_endpoint_refs): the first identity that binds it keeps it for as long as any of its sockets
 * holds it (same-identity co-binders, e.g. SO_REUSEPORT workers, count as refs). A co-binder (SO_REUSEPORT or
 * SO_REUSEADDR) of another identity, managed or not, is refused (EPERM, counted): the kernel would hand it
 * connections judged as the holder's. Only the last holding socket's release removes the entry, so a later
 * listener on the port never inherits the identity of one that exited.
 *   A bind by a workload without identity to a port nobody holds removes a stale entry (one seeded for a socket
 *   that exited) and registers nothing.
 *   When a map is full, a workload with an identity cannot bind (EPERM, counted): its port would otherwise look
 *   unmanaged and be open to whoever may reach unmanaged servers.
 */
#include "programs.h"

#define TAKE_FREE    0   /* nobody holds the key: take it */
#define TAKE_JOINED  1   /* held by this identity: one more ref */
#define TAKE_REFUSED 2   /* held by another identity */
#define TAKE_DEAD    3   /* the last holder is deleting it: retry */

static __always_inline int take(struct local_endpoint_ref *r, __u32 id, int managed)
{
	int res;
	bpf_spin_lock(&r->lock);
	if (r->flags & LREF_F_DEAD) {
		res = TAKE_DEAD;
	} else if (r->refs == 0) {
		res = TAKE_FREE;
		if (managed) {
			r->identity = id;
			r->refs = 1;
			r->flags = 0;
		}
	} else if (r->identity == id) {
		res = TAKE_JOINED;
		if (managed)
			r->refs += 1;
	} else {
		res = TAKE_REFUSED;
	}
	bpf_spin_unlock(&r->lock);
	return res;
}

/* Give back one ref; returns 1 when it was the last (the entry is then marked dead for the caller to delete). */
static __always_inline int give_back(struct local_endpoint_ref *r, __u32 id)
{
	int last = 0;
	bpf_spin_lock(&r->lock);
	if (r->refs && r->identity == id && !(r->flags & LREF_F_DEAD)) {
		r->refs -= 1;
		if (r->refs == 0 && !(r->flags & LREF_F_SEEDED)) {
			r->flags |= LREF_F_DEAD;
			last = 1;
		}
	}
	bpf_spin_unlock(&r->lock);
	return last;
}

/* The last holder: the identity entry goes first, while the dead ref still keeps binders out, then the ref. */
static __always_inline void forget(const struct local_endpoint_key *k, __u32 id)
{
	__u32 *cur = local_endpoint_identity.lookup((struct local_endpoint_key *)k);
	if (cur && *cur == id)
		local_endpoint_identity.delete((struct local_endpoint_key *)k);
	local_endpoint_refs.delete((struct local_endpoint_key *)k);
}

static __always_inline int record_bind(struct bpf_sock *sk, const __u8 *addr)
{
	__u32 id = current_identity();
	int managed = id != ID_UNMANAGED;
	struct local_endpoint_key k = {};
	__builtin_memcpy(k.addr, addr, 16);
	k.port = sk->src_port;
	k.proto = sk->protocol;
	struct local_endpoint_ref fresh = {};
	int res = TAKE_DEAD;
	/* two tries: a dead entry is one its last holder is deleting right now */
	for (int i = 0; i < 2 && res == TAKE_DEAD; i++) {
		struct local_endpoint_ref *r = local_endpoint_refs.lookup(&k);
		if (!r) {
			if (!managed) {
				res = TAKE_FREE;
				break;
			}
			fresh.identity = id;
			fresh.refs = 1;
			if (local_endpoint_refs.insert(&k, &fresh) == 0) {
				res = TAKE_FREE;
				break;
			}
			r = local_endpoint_refs.lookup(&k);
			if (!r) {
				counter_add(COUNTER_LOCAL_ENDPOINTS_FULL);
				return 0;   /* fail closed: the bind fails with EPERM */
			}
		}
		res = take(r, id, managed);
	}
	if (res == TAKE_REFUSED) {
		counter_add(COUNTER_PORT_COBIND_REFUSED);
		return 0;
	}
	if (res == TAKE_DEAD) {
		counter_add(COUNTER_PORT_BIND_RACE);
		return 0;
	}
	if (!managed) {
		/* nobody holds it: an entry left from a socket that exited must not stick to this one */
		if (res == TAKE_FREE)
			local_endpoint_identity.delete(&k);
		return 1;
	}
	struct bound_port *b = bound_port.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!b) {
		struct local_endpoint_ref *r = local_endpoint_refs.lookup(&k);
		if (r && give_back(r, id))
			forget(&k, id);
		counter_add(COUNTER_PORT_BIND_RACE);
		return 0;
	}
	__builtin_memcpy(&b->key, &k, sizeof(k));
	b->identity = id;
	if (local_endpoint_identity.update(&k, &id)) {
		struct local_endpoint_ref *r = local_endpoint_refs.lookup(&k);
		if (r && give_back(r, id))
			forget(&k, id);
		b->identity = ID_NONE;
		counter_add(COUNTER_LOCAL_ENDPOINTS_FULL);
		return 0;
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

/* A socket that registered a port gives its ref back; the last one removes the port's identity. */
int aimesh_sock_release(struct bpf_sock *sk)
{
	struct bound_port *b = bound_port.sk_storage_get(sk, 0, 0);
	if (!b || b->identity == ID_NONE)
		return 1;
	struct local_endpoint_key k = b->key;
	__u32 id = b->identity;
	b->identity = ID_NONE;
	struct local_endpoint_ref *r = local_endpoint_refs.lookup(&k);
	if (r && give_back(r, id))
		forget(&k, id);
	return 1;
}
