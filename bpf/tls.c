/* TLS capture: uprobes on OpenSSL's libssl copy the plaintext of a marked capture socket into capture_events.
 *
 *   uprobe SSL_write/SSL_write_ex/SSL_read/SSL_read_ex   keep (SSL *, buf, out-length pointer) per thread: tls_calls
 *   uprobe SSL_do_handshake                               the same with no data: the handshake's syscalls mark the socket
 *   (the send/receive syscalls inside the call)           lib/tls.h tls_note_fd: the call's fd, SSL * -> fd, socket TLS
 *   uretprobe of each                                     on success, copy ret / *written / *readbytes bytes of buf
 *                                                         (capture_data of bpf/capture.c, flagged CAPTURE_EV_F_TLS)
 * The agent attaches these once per libssl file a governed process maps (agent/kernel/uprobes.py). A call on a thread
 * that is not governed, or while no identity has LLM capture on, costs one runtime_config and one identity lookup.
 *   reads: runtime_config, process_identity, cgroup_identity, cgroup_inherit, tls_calls, tls_ssl_fd, capture_sockets
 *   writes: tls_calls, capture_sockets (flags), capture_events, verdict_counters
 * This file follows capture.c in the assembled program text (agent/kernel/source.py): it uses capture_data.
 */
#include "programs.h"
#include "lib/tls.h"
#include <uapi/linux/ptrace.h>

static __always_inline int tls_enter(struct pt_regs *ctx, __u8 dir, int ex)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg || !(cfg->flags & CFG_F_LLM_CAPTURE) || current_identity() < ID_FIRST_USER)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_call *outer = tls_calls.lookup(&id);
	if (outer) {
		outer->depth++;   /* a hooked call inside another one: its syscalls belong to the outer call */
		return 0;
	}
	struct tls_call c = {};
	c.ssl = PT_REGS_PARM1(ctx);
	c.buf = PT_REGS_PARM2(ctx);
	c.len_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
	c.direction = dir;
	struct tls_ssl_key k = { .ssl = c.ssl, .tgid = id >> 32 };
	__u32 *fd = tls_ssl_fd.lookup(&k);
	if (fd) {
		c.fd = *fd;
		c.has_fd = 1;
	}
	tls_calls.update(&id, &c);
	return 0;
}

static __always_inline int tls_exit(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_call *p = tls_calls.lookup(&id);
	if (!p)
		return 0;
	if (p->depth) {
		p->depth--;
		return 0;
	}
	struct tls_call c = *p;
	tls_calls.delete(&id);
	if (!c.direction || !c.has_fd)
		return 0;
	long ret = (int)PT_REGS_RC(ctx);   /* SSL_read/SSL_write return an int: -1 comes back as 0xffffffff in rax */
	__u64 n = 0;
	if (c.len_ptr) {
		if (ret != 1 || bpf_probe_read_user(&n, sizeof(n), (const void *)c.len_ptr))
			return 0;
	} else {
		if (ret <= 0)
			return 0;
		n = ret;
	}
	struct capture_sock_key k = { .tgid = id >> 32, .fd = c.fd };
	struct capture_sock *s = capture_sockets.lookup(&k);
	if (!s || !n)
		return 0;
	s->flags |= CAPTURE_SOCK_F_TLS;
	capture_data(&k, s, c.direction, CAPTURE_EV_F_TLS, (const __u8 *)c.buf, n);
	return 0;
}

int aimesh_ssl_write(struct pt_regs *ctx) { return tls_enter(ctx, CAPTURE_DIR_SEND, 0); }
int aimesh_ssl_write_ex(struct pt_regs *ctx) { return tls_enter(ctx, CAPTURE_DIR_SEND, 1); }
int aimesh_ssl_read(struct pt_regs *ctx) { return tls_enter(ctx, CAPTURE_DIR_RECV, 0); }
int aimesh_ssl_read_ex(struct pt_regs *ctx) { return tls_enter(ctx, CAPTURE_DIR_RECV, 1); }
int aimesh_ssl_handshake(struct pt_regs *ctx) { return tls_enter(ctx, 0, 0); }
int aimesh_ssl_return(struct pt_regs *ctx) { return tls_exit(ctx); }
