/* cgroup sock_addr hooks: connect4/6, sendmsg4/6, getpeername4/6, recvmsg4/6.
 *
 * connect / sendmsg: judge (source identity, identity of the socket the dial reaches — the unspecified address is
 *   this host —, port, proto) against the allow-list; a deny returns 0
 *   (the caller gets EPERM); an allowed or audited connection may be rewritten to a redirect backend.
 *   The source is the process's identity, else that of the cgroup the socket was created in (socket_cgroup).
 *   reads:  runtime_config, process_identity, cgroup_identity, cgroup_inherit, socket_cgroup,
 *           local_endpoint_identity, local_address,
 *           dns_resolver, udp_reply,
 *           endpoint_identity, identity_info, policy_verdict, redirect_service, redirect_backend
 *   writes: dialed_address and flow_state (sk storage), udp_reverse_nat, udp_flows, verdict_counters, decision_counts,
 *           capture_connect (a TCP connect toward an identity with LLM capture on: lib/capture.h; not for a connect
 *           handed to the gateway, which records those calls itself),
 *           gateway_pending (a TCP connect whose policy needs L7: rewritten to the gateway, lib/gateway.h),
 *           decision_events (not for plain allows unless CFG_F_ALL_DECISIONS)
 * L7 gateway: an allowed TCP connect whose policy carries POLICY_F_GATEWAY goes to runtime_config.gw_*, never
 *   from the gateway's own identity (ID_F_GATEWAY); with no reachable gateway it is denied. A destination with
 *   ID_F_GW_ORIGINATE takes direct connections from the gateway only (else REASON_NO_POLICY_DST).
 * getpeername / recvmsg: put back the address the client dialed (reads dialed_address, udp_reverse_nat).
 */
#include "programs.h"
#include "lib/gateway.h"

struct sock_target {
	__u8  addr[16];
	__u16 port;       /* host order */
	__u8  is_v6;
	__u8  rewritten;
};

/* UDP a socket sends to a peer that wrote to this very socket first, and was let in (cgroup_skb ingress put it in
 * udp_reply: a remote peer judged allowed or audited there, a local one judged at its own sendmsg/connect), answers
 * that peer; judging the reply as a new flow would deny every governed UDP server's answers. Which port the socket
 * bound says nothing: any workload can bind one. Covers sendmsg and a connect back to that peer. */
static __always_inline int is_udp_reply(struct bpf_sock_addr *ctx, __u8 proto, const struct sock_target *t)
{
	if (proto != IPPROTO_UDP)
		return 0;
	struct socket_peer_key k = { .cookie = bpf_get_socket_cookie(ctx), .port = t->port };
	__builtin_memcpy(k.addr, t->addr, 16);
	return udp_reply.lookup(&k) != 0;
}

/* The address the kernel will deliver a dial of t to, into out: the unspecified address means this host. A dial of
 * 0.0.0.0 (or ::ffff:0.0.0.0 on an IPv6 socket) goes to the socket's bound IPv4 address, else to 127.0.0.1 (the
 * route lookup's "no daddr"); a dial of :: goes to ::1, or to 127.0.0.1 from a socket bound v4-mapped
 * (tcp_v6_connect, __ip6_datagram_connect, udpv6_sendmsg). Any other address is delivered as dialed. */
static __always_inline void delivery_address(struct bpf_sock_addr *ctx, const struct sock_target *t, __u8 *out)
{
	__builtin_memcpy(out, t->addr, 16);
	int v4 = addr_is_v4(t->addr);
	if (v4 ? addr_v4(t->addr) != 0 : !addr_is_zero(t->addr))
		return;
	struct bpf_sock *sk = ctx->sk;
	__u32 bound4 = 0;
	if (sk && v4) {
		bound4 = sk->src_ip4;
		barrier_var(bound4);
	} else if (sk) {
		union addr16 b;
		ADDR_LOAD_V6(b.b, sk->src_ip6);
		v4 = addr_is_v4(b.b);   /* bound v4-mapped: the IPv4 loopback, whatever the bound address */
	}
	if (v4)
		addr_from_v4(out, bound4 ? bound4 : bpf_htonl(0x7f000001));
	else
		out[15] = 1;   /* ::1 */
}

/* The whole connect/sendmsg decision; returns 1 to let the call proceed. t is updated when redirected. */
static __always_inline int judge(struct bpf_sock_addr *ctx, __u8 hook, struct sock_target *t)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg)
		return 1;
	__u8 gen = cfg->active_gen;
	__u8 proto = ctx->protocol;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	__u64 cgroup_id = socket_cgroup_id(ctx->sk);   /* the socket's cgroup, not where its process moved since */
	__u32 src = workload_identity(cgroup_id);
	if (is_udp_reply(ctx, proto, t)) {
		counter_add(COUNTER_DECISION(hook, VERDICT_ALLOWED));
		return 1;
	}
	/* judged on who will answer; recorded as dialed */
	__u8 delivered[16];
	delivery_address(ctx, t, delivered);
	__u32 dst = destination_identity(gen, delivered, t->port, proto);
	struct decision d = {};
	decide(&d, cfg, src, dst, delivered, t->port, proto);

	struct dialed dialed = {};
	__builtin_memcpy(dialed.addr, t->addr, 16);
	dialed.port = t->port;
	__u32 actual_dst = dst;

	__u32 sf = identity_flags(src, gen);
	int to_gateway = 0;
	if (d.reason == REASON_POLICY && (d.policy_flags & POLICY_F_GATEWAY) && !(sf & ID_F_GATEWAY) &&
	    hook == HOOK_CONNECT && proto == IPPROTO_TCP) {
		if (gateway_target(cfg, t->addr, &t->port, t->is_v6)) {
			to_gateway = 1;
			t->rewritten = 1;
			actual_dst = destination_identity(gen, t->addr, t->port, proto);
			d.flags |= EV_F_REDIRECTED | EV_F_GATEWAY;
			if (d.verdict == VERDICT_ALLOWED)
				d.verdict = VERDICT_REDIRECTED;
			gateway_pending_put(cookie, dialed.addr, dialed.port, src, dst, gen, d.policy_flags);
		} else {
			d.verdict = VERDICT_DENIED;   /* never past the gateway: no gateway this socket can reach */
			d.reason = REASON_FAMILY;
		}
	}

	if (!to_gateway && (d.verdict != VERDICT_DENIED || d.reason == REASON_SUNSET)) {
		struct redirect_value *svc = redirect_lookup(gen, src, dst);
		if (svc && (d.reason != REASON_SUNSET || (svc->flags & EV_F_LIFECYCLE))) {
			struct backend *b = backend_pick(gen, svc);
			if (b && b->is_v4 == 0 && !t->is_v6) {
				d.reason = REASON_FAMILY;   /* an IPv4 socket cannot reach an IPv6 backend */
			} else if (b) {
				__builtin_memcpy(t->addr, b->addr, 16);
				t->port = b->port;
				t->rewritten = 1;
				/* who really serves the backend (a split can span versions); else the configured target */
				actual_dst = destination_identity(gen, t->addr, t->port, proto);
				if (actual_dst == ID_WORLD || actual_dst == ID_UNMANAGED)
					actual_dst = svc->target_id;
				d.flags |= EV_F_REDIRECTED | (svc->flags & EV_F_LIFECYCLE);
				if (d.reason == REASON_SUNSET) {
					/* the successor takes the connection: judged on the dialed identity, allowed */
					d.reason = REASON_POLICY;
					d.verdict = VERDICT_ALLOWED;
				}
				if (d.verdict == VERDICT_ALLOWED)
					d.verdict = VERDICT_REDIRECTED;
			}
		}
	}

	/* tls: originate: the provider is reached through the gateway only (it holds the key, it speaks TLS) */
	if (!to_gateway && d.verdict != VERDICT_DENIED && !(sf & ID_F_GATEWAY) &&
	    ((identity_flags(dst, gen) | identity_flags(actual_dst, gen)) & ID_F_GW_ORIGINATE)) {
		d.verdict = VERDICT_DENIED;
		d.reason = REASON_NO_POLICY_DST;   /* no policy allows it directly: through the gateway only */
	}

	if (d.verdict != VERDICT_DENIED && t->rewritten) {
		__builtin_memcpy(dialed.backend, t->addr, 16);
		dialed.backend_port = t->port;
		if (hook == HOOK_CONNECT) {
			struct dialed *st = dialed_address.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (st)
				*st = dialed;
		}
		struct socket_peer_key rk = { .cookie = cookie, .port = t->port };
		__builtin_memcpy(rk.addr, t->addr, 16);
		if (udp_reverse_nat.update(&rk, &dialed))
			counter_add(COUNTER_REVERSE_NAT_FULL);
	}

	counter_add(COUNTER_DECISION(hook, d.verdict));

	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (d.verdict != VERDICT_DENIED) {
		if (proto == IPPROTO_TCP) {
			/* sock_ops picks this up at established and reports the connection at close */
			struct flow_origin *fo = flow_state.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (fo) {
				fo->cgroup_id = cgroup_id;
				__builtin_memcpy(fo->dialed_addr, dialed.addr, 16);
				fo->pid = pid_tgid >> 32;
				fo->src_id = src;
				fo->dst_id = dst;
				fo->actual_dst_id = actual_dst;
				fo->dialed_port = dialed.port;
				fo->verdict = d.verdict;
				fo->reason = d.reason;
				fo->flags = d.flags;
				bpf_get_current_comm(fo->comm, sizeof(fo->comm));
			}
			if (hook == HOOK_CONNECT && !to_gateway)   /* the gateway records it (gateway: true) */
				capture_mark_connect(cfg, cookie, src, dst, actual_dst, &dialed);
		} else if (proto == IPPROTO_UDP) {
			/* the cgroup_skb programs count bytes into this entry; one decision event per entry and verdict */
			struct socket_peer_key uk = { .cookie = cookie, .port = t->port };
			__builtin_memcpy(uk.addr, t->addr, 16);
			struct udp_flow *uf = udp_flows.lookup(&uk);
			if (uf && uf->verdict == d.verdict && uf->dst_id == dst)
				return 1;
			struct udp_flow nf = {};
			nf.first_ns = bpf_ktime_get_ns();
			nf.last_ns = nf.first_ns;
			nf.cgroup_id = cgroup_id;
			__builtin_memcpy(nf.dialed_addr, dialed.addr, 16);
			nf.pid = pid_tgid >> 32;
			nf.src_id = src;
			nf.dst_id = dst;
			nf.actual_dst_id = actual_dst;
			nf.dialed_port = dialed.port;
			nf.verdict = d.verdict;
			nf.reason = d.reason;
			nf.flags = d.flags;
			nf.is_v6 = t->is_v6;
			bpf_get_current_comm(nf.comm, sizeof(nf.comm));
			if (udp_flows.update(&uk, &nf))
				counter_add(COUNTER_UDP_FLOWS_FULL);
		}
	}

	decision_count(src, dst, hook, d.verdict, d.flags);
	if (!decision_event_wanted(cfg, d.verdict))
		return 1;
	struct decision_event *ev = decision_reserve();
	if (ev) {
		ev->ts_ns = bpf_ktime_get_ns();
		ev->cgroup_id = cgroup_id;
		ev->cookie = cookie;
		__builtin_memcpy(ev->dialed_addr, dialed.addr, 16);
		__builtin_memcpy(ev->actual_addr, t->addr, 16);
		__builtin_memset(ev->peer_addr, 0, 16);
		ev->pid = pid_tgid >> 32;
		ev->src_id = src;
		ev->dst_id = dst;
		ev->actual_dst_id = actual_dst;
		ev->rule_id = d.rule_id;
		ev->dialed_port = dialed.port;
		ev->actual_port = t->port;
		ev->peer_port = 0;
		ev->is_v6 = t->is_v6;
		ev->proto = proto;
		ev->hook = hook;
		ev->verdict = d.verdict;
		ev->reason = d.reason;
		ev->flags = d.flags;
		bpf_get_current_comm(ev->comm, sizeof(ev->comm));
		decision_events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
	}
	return d.verdict != VERDICT_DENIED;
}

static __always_inline void target_from_v4(struct bpf_sock_addr *ctx, struct sock_target *t)
{
	addr_from_v4(t->addr, ctx->user_ip4);
	t->port = bpf_ntohs(ctx->user_port);
	t->is_v6 = 0;
	t->rewritten = 0;
}

static __always_inline void target_from_v6(struct bpf_sock_addr *ctx, struct sock_target *t)
{
	ADDR_LOAD_V6(t->addr, ctx->user_ip6);
	t->port = bpf_ntohs(ctx->user_port);
	t->is_v6 = 1;
	t->rewritten = 0;
}

static __always_inline void write_v4(struct bpf_sock_addr *ctx, const __u8 *addr, __u16 port)
{
	ctx->user_ip4 = addr_v4(addr);
	ctx->user_port = bpf_htons(port);
}

static __always_inline void write_v6(struct bpf_sock_addr *ctx, const __u8 *addr, __u16 port)
{
	union addr16 a;
	__builtin_memcpy(a.b, addr, 16);
	ctx->user_ip6[0] = a.w[0];
	ctx->user_ip6[1] = a.w[1];
	ctx->user_ip6[2] = a.w[2];
	ctx->user_ip6[3] = a.w[3];
	ctx->user_port = bpf_htons(port);
}

static __always_inline int sock_judge4(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct sock_target t;
	target_from_v4(ctx, &t);
	int ok = judge(ctx, hook, &t);
	if (ok && t.rewritten)
		write_v4(ctx, t.addr, t.port);
	return ok;
}

static __always_inline int sock_judge6(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct sock_target t;
	target_from_v6(ctx, &t);
	int ok = judge(ctx, hook, &t);
	if (ok && t.rewritten)
		write_v6(ctx, t.addr, t.port);
	return ok;
}

int aimesh_connect4(struct bpf_sock_addr *ctx) { return sock_judge4(ctx, HOOK_CONNECT); }
int aimesh_connect6(struct bpf_sock_addr *ctx) { return sock_judge6(ctx, HOOK_CONNECT); }
int aimesh_sendmsg4(struct bpf_sock_addr *ctx) { return sock_judge4(ctx, HOOK_SENDMSG); }
int aimesh_sendmsg6(struct bpf_sock_addr *ctx) { return sock_judge6(ctx, HOOK_SENDMSG); }

/* Restore: the peer a redirected socket reports is the address it dialed. */
static __always_inline struct dialed *restore_lookup(struct bpf_sock_addr *ctx, const __u8 *addr, __u16 port)
{
	struct dialed *st = dialed_address.sk_storage_get(ctx->sk, 0, 0);
	if (st && st->backend_port == port && addr_equal(st->backend, addr))
		return st;
	struct socket_peer_key rk = { .cookie = bpf_get_socket_cookie(ctx), .port = port };
	__builtin_memcpy(rk.addr, addr, 16);
	return udp_reverse_nat.lookup(&rk);
}

static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	struct sock_target t;
	target_from_v4(ctx, &t);
	struct dialed *d = restore_lookup(ctx, t.addr, t.port);
	if (d && addr_is_v4(d->addr))
		write_v4(ctx, d->addr, d->port);
	return 1;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
	struct sock_target t;
	target_from_v6(ctx, &t);
	struct dialed *d = restore_lookup(ctx, t.addr, t.port);
	if (d)
		write_v6(ctx, d->addr, d->port);
	return 1;
}

int aimesh_getpeername4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int aimesh_getpeername6(struct bpf_sock_addr *ctx) { return restore6(ctx); }
int aimesh_recvmsg4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int aimesh_recvmsg6(struct bpf_sock_addr *ctx) { return restore6(ctx); }
