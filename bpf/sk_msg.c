/* sk_msg verdict on fastpath_sockets: a send on a fast-path socket goes straight to the peer socket's receive
 * queue (BPF_F_INGRESS), skipping the loopback TCP/IP stack. Decided at the socket's first send: redirect when the
 * peer is in fastpath_state too, else the normal path for the life of the socket (counted).
 *   Also emits interim flow records for fast-path connections (they make no ACKs for sock_ops to see).
 *   reads/writes: fastpath_state (mode, bytes both ways), flow_state, flow_events, verdict_counters
 */
#include "programs.h"

static __always_inline void msg_tuple(struct sk_msg_md *msg, struct sock_tuple *own, struct sock_tuple *peer)
{
	__u8 local[16], remote[16];
	if (msg->family == 2 /* AF_INET */) {
		ADDR_LOAD_V4(local, msg->local_ip4);
		ADDR_LOAD_V4(remote, msg->remote_ip4);
	} else {
		ADDR_LOAD_V6(local, msg->local_ip6);
		ADDR_LOAD_V6(remote, msg->remote_ip6);
	}
	__u16 lport = msg->local_port;
	__u16 rport = (__u16)bpf_ntohl(msg->remote_port);
	tuple_from(own, local, lport, remote, rport);
	tuple_from(peer, remote, rport, local, lport);
}

/* Fast-path traffic makes no ACKs, so sock_ops' RTT callback never fires: interim records come from here. */
static __always_inline void fastpath_interim(struct sk_msg_md *msg, const struct sock_tuple *own,
					     const struct fastpath_state *st, __u32 family)
{
	const struct runtime_config *cfg = config_get();
	struct bpf_sock *sk = msg->sk;
	if (!cfg || !cfg->interim_ns || !sk)
		return;
	struct flow_origin *fo = flow_state.sk_storage_get(sk, 0, 0);
	if (!fo || !fo->side)
		return;
	__u64 now = bpf_ktime_get_ns();
	if (now - fo->last_report_ns < cfg->interim_ns)
		return;
	struct flow_event *ev = flow_reserve();
	if (!ev)
		return;
	flow_fill_origin(ev, fo, FLOW_KIND_INTERIM, now);
	ev->bytes_sent = st->bytes_sent;
	ev->bytes_received = st->bytes_received;
	__builtin_memcpy(ev->local_addr, own->local, 16);
	__builtin_memcpy(ev->remote_addr, own->remote, 16);
	ev->srtt_us = 0;
	ev->retransmits = 0;
	ev->segs_out = 0;
	ev->segs_in = 0;
	ev->local_port = own->local_port;
	ev->remote_port = own->remote_port;
	ev->is_v6 = family != 2;
	flow_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	fo->last_report_ns = now;
}

int aimesh_sk_msg(struct sk_msg_md *msg)
{
	struct sock_tuple own, peer;
	msg_tuple(msg, &own, &peer);
	struct fastpath_state *st = fastpath_state.lookup(&own);
	if (!st)
		return SK_PASS;
	if (st->mode == FASTPATH_UNDECIDED) {
		if (fastpath_state.lookup(&peer)) {
			st->mode = FASTPATH_REDIRECT;
		} else {
			st->mode = FASTPATH_NORMAL;
			counter_add(COUNTER_FASTPATH_UNWATCHED);
		}
	}
	if (st->mode != FASTPATH_REDIRECT)
		return SK_PASS;
	__u32 size = msg->size;
	long verdict = fastpath_sockets.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict != SK_PASS) {
		/* the peer left fastpath_sockets (it closed): SK_DROP would fail this send with EACCES, which the
		 * application never sees without the fast path. The TCP stack gives what it would have (the send
		 * goes out, the peer answers RST, the next send gets EPIPE), for the rest of this socket's life. */
		st->mode = FASTPATH_NORMAL;
		return SK_PASS;
	}
	__sync_fetch_and_add(&st->bytes_sent, size);
	struct fastpath_state *ps = fastpath_state.lookup(&peer);
	if (ps)
		__sync_fetch_and_add(&ps->bytes_received, size);
	counter_add(COUNTER_FASTPATH_MESSAGES);
	fastpath_interim(msg, &own, st, msg->family);
	__u32 slot = COUNTER_FASTPATH_BYTES;
	__u64 *c = verdict_counters.lookup(&slot);
	if (c)
		*c += size;
	return SK_PASS;
}
