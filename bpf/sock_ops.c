/* cgroup sock_ops: follows each TCP connection of the governed cgroups from established to close.
 *   ACTIVE_ESTABLISHED  (client side): completes the flow_state the connect hook created; remembers the local
 *                       client's identity in local_peer for the server side of a same-host connection; a
 *                       connect handed to the L7 gateway moves from gateway_pending to gateway_origin, keyed by
 *                       this socket's local address and port (lib/gateway.h).
 *   PASSIVE_ESTABLISHED (server side): flow_state from the local server's identity and the peer's (local_peer for
 *                       a local client, endpoint_identity for a remote one), judged like a connect.
 *   RTT                 interim record when the connection has not reported for runtime_config.interim_ns.
 *   STATE -> CLOSE      one flow_event per connection side.
 *   reads:  runtime_config, local_endpoint_identity, local_address, dns_resolver, endpoint_identity, identity_info,
 *           policy_verdict
 *   Fast path: an allowed connection whose peer is on this host joins fastpath_sockets (lib/fastpath.h) when the
 *   fast path is on for every pair or the pair's policy opted in (both sides judge the pair the same way: source,
 *   local server, port); its record adds what sk_msg carried.
 *   writes: flow_state (sk storage), local_peer, gateway_origin, gateway_pending (delete), fastpath_sockets, fastpath_state, flow_events, verdict_counters
 */
#include "programs.h"
#include "lib/gateway.h"

static __always_inline void on_established(struct bpf_sock_ops *skops, __u8 side)
{
	const struct runtime_config *cfg = config_get();
	struct bpf_sock *sk = skops->sk;
	if (!cfg || !sk)
		return;
	struct flow_origin *fo = flow_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!fo)
		return;
	__u8 local[16], remote[16];
	sockops_addrs(skops, local, remote);
	__u16 rport = sockops_remote_port(skops);
	int remote_is_local = addr_is_local(remote);
	__u8 policy_flags = 0;      /* of the policy that allowed the pair: POLICY_F_FAST_PATH opts it in */

	if (side == SIDE_CLIENT) {
		gateway_established(bpf_get_socket_cookie(skops), local, skops->local_port);
		if (fo->src_id == ID_NONE)
			counter_add(COUNTER_FLOWS_UNTRACKED);   /* socket connected before the programs were attached */
		if (remote_is_local) {
			struct local_endpoint_key k = { .port = skops->local_port, .proto = IPPROTO_TCP };
			__builtin_memcpy(k.addr, local, 16);
			struct peer_origin po = { .src_id = fo->src_id, .pid = fo->pid };
			local_peer.update(&k, &po);
			/* the pair as the server side judges it (same source, same local server), for its fast-path opt-in */
			__u32 dst = local_endpoint_lookup(remote, rport, IPPROTO_TCP, 1);
			struct decision cd = {};
			decide(&cd, cfg, fo->src_id, dst == ID_NONE ? ID_UNMANAGED : dst, remote, rport, IPPROTO_TCP);
			policy_flags = cd.policy_flags;
		}
	} else {
		__u32 dst = local_endpoint_lookup(local, skops->local_port, IPPROTO_TCP, 1);
		if (dst == ID_NONE)
			dst = ID_UNMANAGED;
		__u32 src = ID_NONE;
		if (remote_is_local) {
			struct local_endpoint_key k = { .port = rport, .proto = IPPROTO_TCP };
			__builtin_memcpy(k.addr, remote, 16);
			struct peer_origin *po = local_peer.lookup(&k);
			src = po ? po->src_id : ID_UNMANAGED;
		} else {
			src = endpoint_lookup(cfg->active_gen, remote, 0);
			if (src == ID_NONE)
				src = ID_WORLD;
		}
		struct decision d = {};
		decide(&d, cfg, src, dst, local, skops->local_port, IPPROTO_TCP);
		fo->src_id = src;
		fo->dst_id = dst;
		fo->actual_dst_id = dst;
		fo->verdict = d.verdict == VERDICT_DENIED ? VERDICT_ALLOWED : d.verdict;  /* it got through: ingress allowed it */
		fo->reason = d.reason;
		fo->flags = d.flags;
		policy_flags = d.policy_flags;
		__builtin_memcpy(fo->dialed_addr, local, 16);
		fo->dialed_port = skops->local_port;
	}
	fo->side = side;
	fastpath_join(skops, local, remote, rport, remote_is_local, fo->verdict, policy_flags);
	fo->cookie = bpf_get_socket_cookie(skops);
	fo->start_ns = bpf_ktime_get_ns();
	fo->last_report_ns = fo->start_ns;
	__u32 flags = BPF_SOCK_OPS_STATE_CB_FLAG;
	if (cfg->interim_ns)
		flags |= BPF_SOCK_OPS_RTT_CB_FLAG;
	bpf_sock_ops_cb_flags_set(skops, flags);
}

static __always_inline void on_close(struct bpf_sock_ops *skops, __u32 old_state)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct flow_origin *fo = flow_state.sk_storage_get(sk, 0, 0);
	if (!fo || !fo->side)
		return;
	flow_emit(skops, fo, FLOW_KIND_CONNECTION, old_state);
	fastpath_forget(skops);
	if (fo->side == SIDE_CLIENT) {
		__u8 local[16], remote[16];
		sockops_addrs(skops, local, remote);
		struct local_endpoint_key k = { .port = skops->local_port, .proto = IPPROTO_TCP };
		__builtin_memcpy(k.addr, local, 16);
		local_peer.delete(&k);
	}
	fo->side = 0;   /* report once */
}

static __always_inline void on_rtt(struct bpf_sock_ops *skops)
{
	const struct runtime_config *cfg = config_get();
	struct bpf_sock *sk = skops->sk;
	if (!cfg || !cfg->interim_ns || !sk)
		return;
	struct flow_origin *fo = flow_state.sk_storage_get(sk, 0, 0);
	if (!fo || !fo->side)
		return;
	if (bpf_ktime_get_ns() - fo->last_report_ns < cfg->interim_ns)
		return;
	flow_emit(skops, fo, FLOW_KIND_INTERIM, 0);
}

int aimesh_sock_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops, SIDE_CLIENT);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(skops, SIDE_SERVER);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == TCP_STATE_CLOSE)
			on_close(skops, skops->args[0]);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		on_rtt(skops);
		break;
	}
	return 1;
}
