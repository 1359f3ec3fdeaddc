/* Flow accounting helpers: read a TCP socket's counters in sock_ops and emit a flow_event. */
#ifndef AIMESH_LIB_FLOW_H
#define AIMESH_LIB_FLOW_H

#define TCP_STATE_FIN_WAIT2 5
#define TCP_STATE_TIME_WAIT 6
#define TCP_STATE_CLOSE     7
#define TCP_STATE_LAST_ACK  9
#define TCP_STATE_CLOSING   11
#define TCP_STATE_CLOSE_WAIT 8

/* bytes_acked counts our SYN on the client side (a passive socket is born with it acknowledged) and our FIN once
 * acknowledged, which the state we close from tells. */
static __always_inline __u64 payload_sent(__u64 acked, __u32 old_state, __u8 side)
{
	__u64 ctl = side == SIDE_CLIENT ? 1 : 0;
	if (old_state == TCP_STATE_LAST_ACK || old_state == TCP_STATE_FIN_WAIT2 || old_state == TCP_STATE_CLOSING ||
	    old_state == TCP_STATE_TIME_WAIT)
		ctl += 1;
	return acked > ctl ? acked - ctl : 0;
}

/* bytes_received counts the peer's FIN. Closing from FIN_WAIT2 is taken as a FIN received (the usual graceful
 * close); an orphaned FIN_WAIT2 timing out is then one byte short. */
static __always_inline __u64 payload_received(__u64 received, __u32 old_state)
{
	if (old_state == TCP_STATE_LAST_ACK || old_state == TCP_STATE_FIN_WAIT2 || old_state == TCP_STATE_CLOSING ||
	    old_state == TCP_STATE_TIME_WAIT || old_state == TCP_STATE_CLOSE_WAIT)
		return received > 0 ? received - 1 : 0;
	return received;
}

/* The parts of a flow_event that come from the socket's origin. */
static __always_inline void flow_fill_origin(struct flow_event *ev, const struct flow_origin *fo, __u8 kind, __u64 now)
{
	ev->cookie = fo->cookie;
	ev->start_ns = fo->start_ns;
	ev->end_ns = now;
	ev->cgroup_id = fo->cgroup_id;
	__builtin_memcpy(ev->dialed_addr, fo->dialed_addr, 16);
	ev->pid = fo->pid;
	ev->src_id = fo->src_id;
	ev->dst_id = fo->dst_id;
	ev->actual_dst_id = fo->actual_dst_id;
	ev->dialed_port = fo->dialed_port;
	ev->proto = IPPROTO_TCP;
	ev->side = fo->side;
	ev->kind = kind;
	ev->verdict = fo->verdict;
	ev->reason = fo->reason;
	ev->flags = fo->flags;
	ev->pad[0] = 0;
	ev->pad[1] = 0;
	ev->pad[2] = 0;
	__builtin_memcpy(ev->comm, fo->comm, 16);
}

/* A reservation can fail with room to spare: since 6.15 the ring's lock is a resilient spinlock that gives up
 * under contention between CPUs (seen here: a few records per 100k at 12k/s with the ring 2% full). Two retries
 * take nearly all of those; a full ring still fails each time and is counted. */
static __always_inline struct flow_event *flow_reserve(void)
{
	struct flow_event *ev = flow_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!ev)
		ev = flow_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!ev)
		ev = flow_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!ev)
		counter_add(COUNTER_FLOW_EVENTS_LOST);
	return ev;
}

/* sock_ops: a record from the socket's own counters, plus what the fast path carried. */
static __always_inline void flow_emit(struct bpf_sock_ops *skops, struct flow_origin *fo, __u8 kind, __u32 old_state)
{
	struct flow_event *ev = flow_reserve();
	if (!ev)
		return;
	__u64 now = bpf_ktime_get_ns();
	flow_fill_origin(ev, fo, kind, now);
	__u64 sent = payload_sent(skops->bytes_acked, old_state, fo->side);
	__u64 received = payload_received(skops->bytes_received, old_state);
	fastpath_leave(skops, &sent, &received);
	ev->bytes_sent = sent;
	ev->bytes_received = received;
	sockops_addrs(skops, ev->local_addr, ev->remote_addr);
	ev->srtt_us = skops->srtt_us >> 3;
	ev->retransmits = skops->total_retrans;
	ev->segs_out = skops->segs_out;
	ev->segs_in = skops->segs_in;
	ev->local_port = skops->local_port;
	ev->remote_port = sockops_remote_port(skops);
	ev->is_v6 = skops->family != 2;
	flow_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	fo->last_report_ns = now;
}

/* Add one datagram to the socket's udp_flows entry for this remote address (created at sendmsg/connect). */
static __always_inline void udp_account(struct __sk_buff *skb, const __u8 *remote, __u16 rport, __u32 len, int sent)
{
	struct socket_peer_key k = { .cookie = bpf_get_socket_cookie(skb), .port = rport };
	__builtin_memcpy(k.addr, remote, 16);
	struct udp_flow *uf = udp_flows.lookup(&k);
	if (!uf)
		return;
	if (sent) {
		__sync_fetch_and_add(&uf->bytes_sent, len);
		__sync_fetch_and_add(&uf->packets_sent, 1);
	} else {
		__sync_fetch_and_add(&uf->bytes_received, len);
		__sync_fetch_and_add(&uf->packets_received, 1);
	}
	uf->last_ns = bpf_ktime_get_ns();
}

#endif
