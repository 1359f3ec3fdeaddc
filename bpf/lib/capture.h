/* Plaintext capture, connect side: mark the socket of a connection toward an identity with LLM capture on. */
#ifndef AIMESH_LIB_CAPTURE_H
#define AIMESH_LIB_CAPTURE_H

/* Called by the connect hook for an allowed TCP connect. sys_enter (connect) left the fd in capture_connect (only while
 * CFG_F_LLM_CAPTURE is set); mark it ready, with the address as dialed, so sys_exit (connect) moves it to
 * capture_sockets and tells the agent (an OPEN record). Sources without an identity (unmanaged) are never captured. */
static __always_inline void capture_mark_connect(const struct runtime_config *cfg, __u64 cookie, __u32 src, __u32 dst,
						 __u32 actual_dst, const struct dialed *dialed)
{
	if (!(cfg->flags & CFG_F_LLM_CAPTURE) || src < ID_FIRST_USER)
		return;
	__u8 gen = cfg->active_gen;
	if (!(identity_flags(actual_dst, gen) & ID_F_LLM_CAPTURE) && !(identity_flags(dst, gen) & ID_F_LLM_CAPTURE))
		return;
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_sock *c = capture_connect.lookup(&id);
	if (!c)
		return;
	c->cookie = cookie;
	c->src_id = src;
	c->dst_id = dst;
	c->actual_dst_id = actual_dst;
	__builtin_memcpy(c->dialed_addr, dialed->addr, 16);
	c->dialed_port = dialed->port;
	c->ready = 1;
}

#endif
