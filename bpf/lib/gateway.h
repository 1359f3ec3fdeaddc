/* L7 gateway hand-off: a connect whose policy needs L7 (POLICY_F_GATEWAY) goes to the node gateway, and the gateway
 * learns from gateway_origin who dialed what. Included by sock_addr.c (connect) and sock_ops.c (established). */
#ifndef AIMESH_LIB_GATEWAY_H
#define AIMESH_LIB_GATEWAY_H

/* Rewrite addr/port to the gateway's redirect address; 0 when it cannot be reached from this socket (no gateway
 * configured, or an IPv6 gateway for an IPv4 socket): the caller denies, it never lets the connection pass by. */
static __always_inline int gateway_target(const struct runtime_config *cfg, __u8 *addr, __u16 *port, __u8 is_v6)
{
	if (!cfg->gw_port)
		return 0;
	if (!is_v6 && !addr_is_v4(cfg->gw_addr))
		return 0;
	__builtin_memcpy(addr, cfg->gw_addr, 16);
	*port = cfg->gw_port;
	return 1;
}

/* What the gateway will read: the destination as dialed and who dialed it, until the socket is established. */
static __always_inline void gateway_pending_put(__u64 cookie, const __u8 *dialed_addr, __u16 dialed_port, __u32 src,
						__u32 dst, __u8 gen, __u8 policy_flags)
{
	struct gateway_origin o = {};
	__builtin_memcpy(o.addr, dialed_addr, 16);
	o.port = dialed_port;
	o.family = addr_is_v4(dialed_addr) ? 2 /* AF_INET */ : 10 /* AF_INET6 */;
	o.flags = (policy_flags & POLICY_F_TLS) ? GW_ORIGIN_F_TLS : 0;
	o.src_id = src;
	o.dst_id = dst;
	o.policy_gen = gen;
	o.cookie = cookie;
	o.ts_ns = bpf_ktime_get_ns();
	gateway_pending.update(&cookie, &o);
}

/* ACTIVE_ESTABLISHED of a client socket: a pending hand-off moves to gateway_origin under the client's local
 * address and port (the peer the gateway's accept() reports). Runs before the handshake's last ACK is sent, so the
 * entry is there before the gateway can accept. */
static __always_inline void gateway_established(__u64 cookie, const __u8 *local, __u16 local_port)
{
	struct gateway_origin *o = gateway_pending.lookup(&cookie);
	if (!o)
		return;
	struct gateway_client_key k = { .port = local_port };
	__builtin_memcpy(k.addr, local, 16);
	gateway_origin.update(&k, o);
	gateway_pending.delete(&cookie);
}

#endif
