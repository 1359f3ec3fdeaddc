/* Plaintext capture: syscall tracepoints copy what a marked client socket sends and receives into capture_events.
 *
 *   syscalls:sys_enter_connect / sys_exit_connect  (tgid, fd) of a connect the connect hook marked -> capture_sockets
 *   syscalls:sys_enter_close                       forget (tgid, fd), tell the agent (a CLOSE record)
 *   syscalls:sys_enter_write, sys_enter_sendto     copy the bytes sent (up to CAPTURE_CHUNKS_PER_CALL chunks)
 *   syscalls:sys_enter_read/recvfrom + sys_exit    keep the buffer per thread, copy the bytes received (ret)
 *   syscalls:sys_enter_writev/readv/sendmsg/recvmsg on a marked socket: counted as not captured (not copied yet)
 * A socket marked TLS (CAPTURE_SOCK_F_TLS: an SSL_* call used it, lib/tls.h) is not copied here: bpf/tls.c copies
 * its plaintext at the SSL_* return (capture_data with CAPTURE_EV_F_TLS).
 * Every send or receive on the node that is not on a marked socket costs one capture_sockets lookup (a receive also
 * one capture_reads lookup at exit); connects cost nothing unless CFG_F_LLM_CAPTURE is set.
 *   reads: runtime_config, capture_sockets, capture_connect, capture_reads
 *   writes: capture_connect, capture_sockets, capture_reads, capture_events, verdict_counters
 */
#include "programs.h"
#include "lib/tls.h"

#define CAPTURE_EINPROGRESS 115

/* The record reserved in capture_events: the header of abi.h, then the data. */
struct capture_record {
	struct capture_event h;
	__u8 data[CAPTURE_CHUNK];
};

static __always_inline struct capture_sock *capture_find(__u32 fd, struct capture_sock_key *k)
{
	k->tgid = bpf_get_current_pid_tgid() >> 32;
	k->fd = fd;
	return capture_sockets.lookup(k);
}

static __always_inline void capture_header(struct capture_event *h, const struct capture_sock_key *k,
					   const struct capture_sock *s, __u8 kind, __u8 dir, __u8 flags, __u64 ts)
{
	h->ts_ns = ts;
	h->cookie = s->cookie;
	h->tgid = k->tgid;
	h->fd = k->fd;
	h->src_id = s->src_id;
	h->dst_id = s->dst_id;
	h->actual_dst_id = s->actual_dst_id;
	h->total = 0;
	h->offset = 0;
	h->len = 0;
	h->kind = kind;
	h->direction = dir;
	h->flags = flags;
	__builtin_memset(h->pad, 0, sizeof(h->pad));
}

static __always_inline void capture_data(const struct capture_sock_key *k, const struct capture_sock *s, __u8 dir,
					 __u8 flags, const __u8 *buf, __u64 total)
{
	__u64 ts = bpf_ktime_get_ns();
	if (total > (__u64)CAPTURE_CHUNKS_PER_CALL * CAPTURE_CHUNK)
		counter_add(COUNTER_CAPTURE_TRUNCATED);
	for (__u32 i = 0; i < CAPTURE_CHUNKS_PER_CALL; i++) {
		__u64 off = (__u64)i * CAPTURE_CHUNK;
		if (off >= total)
			break;
		struct capture_record *r = capture_events.ringbuf_reserve(sizeof(struct capture_record));
		if (!r) {
			counter_add(COUNTER_CAPTURE_EVENTS_LOST);
			return;
		}
		capture_header(&r->h, k, s, CAPTURE_KIND_DATA, dir, flags, ts);
		__u64 n = total - off;
		if (n > CAPTURE_CHUNK)
			n = CAPTURE_CHUNK;
		r->h.total = total;
		r->h.offset = off;
		/* exactly n bytes: n is 1..CAPTURE_CHUNK on a 64-bit register, which this kernel's verifier accepts (a
		 * fixed CAPTURE_CHUNK read would copy past the caller's buffer and fault at the end of a mapping) */
		if (bpf_probe_read_user(r->data, n, buf + off) == 0) {
			r->h.len = n;
		} else {
			r->h.len = 0;
			counter_add(COUNTER_CAPTURE_READ_FAILED);
		}
		capture_events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
		counter_add(COUNTER_CAPTURE_CHUNKS);
	}
}

static __always_inline int capture_send(__u32 fd, const void *buf, __u64 count)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	if (s && count && !tls_note_fd(fd, s))
		capture_data(&k, s, CAPTURE_DIR_SEND, 0, buf, count);
	return 0;
}

static __always_inline int capture_recv_enter(__u32 fd, const void *buf)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	if (!s || tls_note_fd(fd, s))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_read r = { .buf = (__u64)buf, .fd = fd };
	capture_reads.update(&id, &r);
	return 0;
}

static __always_inline int capture_recv_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_read *p = capture_reads.lookup(&id);
	if (!p)
		return 0;
	struct capture_read r = *p;
	capture_reads.delete(&id);
	if (ret <= 0)
		return 0;
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(r.fd, &k);
	if (s)
		capture_data(&k, s, CAPTURE_DIR_RECV, 0, (const __u8 *)r.buf, ret);
	return 0;
}

static __always_inline int capture_not_copied(__u32 fd)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	if (s && !tls_note_fd(fd, s))
		counter_add(COUNTER_CAPTURE_NOT_CAPTURED);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg || !(cfg->flags & CFG_F_LLM_CAPTURE))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_sock c = {};
	c.fd = args->fd;
	capture_connect.update(&id, &c);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_sock *c = capture_connect.lookup(&id);
	if (!c)
		return 0;
	struct capture_sock v = *c;
	capture_connect.delete(&id);
	struct capture_sock_key k = { .tgid = id >> 32, .fd = v.fd };
	if (!v.ready || (args->ret != 0 && args->ret != -CAPTURE_EINPROGRESS)) {
		capture_sockets.delete(&k);   /* an fd dup2'ed over a captured one is not that socket any more */
		return 0;
	}
	v.ready = 0;
	if (capture_sockets.update(&k, &v))
		counter_add(COUNTER_CAPTURE_SOCKETS_FULL);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(args->fd, &k);
	if (!s)
		return 0;
	struct capture_event *h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
	if (h) {
		capture_header(h, &k, s, CAPTURE_KIND_CLOSE, 0, s->flags & CAPTURE_SOCK_F_TLS ? CAPTURE_EV_F_TLS : 0,
			       bpf_ktime_get_ns());
		capture_events.ringbuf_submit(h, BPF_RB_NO_WAKEUP);
	} else {
		counter_add(COUNTER_CAPTURE_EVENTS_LOST);
	}
	capture_sockets.delete(&k);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return capture_send(args->fd, args->buf, args->count); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return capture_send(args->fd, args->buff, args->len); }
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return capture_recv_enter(args->fd, args->buf); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return capture_recv_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return capture_recv_enter(args->fd, args->ubuf); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return capture_recv_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return capture_not_copied(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return capture_not_copied(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return capture_not_copied(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return capture_not_copied(args->fd); }
