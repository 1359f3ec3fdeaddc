/* Same-node fast path: both sockets of an allowed local TCP connection sit in fastpath_sockets; sk_msg hands each
 * send straight to the peer's receive queue. The decision is taken once per socket, at its first send, so bytes
 * never travel both ways (stack and fast path) and arrive out of order. */
#ifndef AIMESH_LIB_FASTPATH_H
#define AIMESH_LIB_FASTPATH_H

#define FASTPATH_UNDECIDED 0
#define FASTPATH_REDIRECT  1
#define FASTPATH_NORMAL    2

static __always_inline void tuple_from(struct sock_tuple *t, const __u8 *local, __u16 lport, const __u8 *remote,
				       __u16 rport)
{
	__builtin_memcpy(t->local, local, 16);
	__builtin_memcpy(t->remote, remote, 16);
	t->local_port = lport;
	t->remote_port = rport;
	t->pad = 0;
}

/* sock_ops, at established: join the fast path when the peer is on this host and the fast path is on for every pair
 * (runtime_config) or for this one (its policy's POLICY_F_FAST_PATH). Only a socket that joins gets the sockmap's
 * receive path (tcp_bpf_recvmsg), so a pair that did not opt in sees the plain TCP stack whatever the others do. */
static __always_inline void fastpath_join(struct bpf_sock_ops *skops, const __u8 *local, const __u8 *remote,
					  __u16 rport, int remote_is_local, __u8 verdict, __u8 policy_flags)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg || verdict == VERDICT_DENIED)
		return;
	if (!(cfg->flags & CFG_F_FAST_PATH) && !(policy_flags & POLICY_F_FAST_PATH))
		return;
	if (!remote_is_local) {
		counter_add(COUNTER_FASTPATH_REMOTE);
		return;
	}
	struct sock_tuple t;
	tuple_from(&t, local, skops->local_port, remote, rport);
	struct fastpath_state st = {};
	if (fastpath_state.update(&t, &st)) {
		counter_add(COUNTER_FASTPATH_FULL);
		return;
	}
	/* bcc cannot rewrite this call inside a condition: take the result first */
	long err = fastpath_sockets.sock_hash_update(skops, &t, BPF_ANY);
	if (err) {
		fastpath_state.delete(&t);
		counter_add(COUNTER_FASTPATH_FULL);
		return;
	}
	counter_add(COUNTER_FASTPATH_SOCKETS);
}

/* sock_ops, at close: what went by the fast path, and forget the socket (the sockhash drops it by itself). */
static __always_inline void fastpath_leave(struct bpf_sock_ops *skops, __u64 *sent, __u64 *received)
{
	__u8 local[16], remote[16];
	sockops_addrs(skops, local, remote);
	struct sock_tuple t;
	tuple_from(&t, local, skops->local_port, remote, sockops_remote_port(skops));
	struct fastpath_state *st = fastpath_state.lookup(&t);
	if (!st)
		return;
	*sent += st->bytes_sent;
	*received += st->bytes_received;
}

static __always_inline void fastpath_forget(struct bpf_sock_ops *skops)
{
	__u8 local[16], remote[16];
	sockops_addrs(skops, local, remote);
	struct sock_tuple t;
	tuple_from(&t, local, skops->local_port, remote, sockops_remote_port(skops));
	fastpath_state.delete(&t);
}

#endif
