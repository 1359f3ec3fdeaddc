/* Plaintext capture: syscall tracepoints copy what a marked client socket sends and receives into capture_events.
 *
 *   syscalls:sys_enter_connect / sys_exit_connect  (tgid, fd) of a connect the connect hook marked -> capture_sockets
 *   syscalls:sys_enter_close                       forget (tgid, fd), tell the agent (a CLOSE record)
 *   syscalls:sys_enter_write, sys_enter_sendto     copy the bytes sent
 *   syscalls:sys_enter_writev, sys_enter_sendmsg   copy the bytes sent, across the first CAPTURE_IOVECS iovecs
 *   syscalls:sys_enter_read/recvfrom/readv/recvmsg + sys_exit   keep the buffer (or iovec array) per thread, copy
 *                                                  the bytes received (ret)
 * These programs are an optional group (agent/kernel/registry.py group "capture"): the agent links them only while
 * the live policy generation has CFG_F_LLM_CAPTURE, so with no capture identity no syscall on the node pays. While
 * linked, every send or receive that is not on a marked socket costs one capture_sockets lookup (a receive also one
 * capture_reads lookup at exit).
 * What is copied: a send/receive copies chunks of CAPTURE_CHUNK bytes, at most CAPTURE_CHUNKS_PER_CALL of them, and
 * at most what is left of the per-request budget (runtime_config.capture_request_bytes for a run of sends,
 * capture_response_bytes for a run of receives; a send after a receive starts a new request). What it does not copy
 * is one GAP record (counted truncated), so the agent knows the size of the hole. A socket whose first send is a TLS
 * handshake record gets CAPTURE_SOCK_F_TLS and is never copied here; one the agent flagged CAPTURE_SOCK_F_SKIP (its
 * decoder gave up) neither; both are counted not captured, and their close is still reported. A socket an SSL_* call
 * used is marked TLS by lib/tls.h (from the send/receive inside the call); bpf/tls.c copies its plaintext at the
 * SSL_* return through capture_data (CAPTURE_EV_F_TLS), under the same budget. A first send that is a TLS handshake
 * outside any probed SSL_* call (Go, rustls, static BoringSSL) gives one TLS_HANDSHAKE record: the agent's "TLS not
 * visible" report.
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

/* User memory layouts the syscalls hand us (x86_64): struct iovec, and the part of struct user_msghdr from
 * msg_iov on. */
struct capture_iovec {
	__u64 base;
	__u64 len;
};

struct capture_msg_iov {
	__u64 iov;      /* struct user_msghdr.msg_iov, at offset 16 */
	__u64 iovlen;   /* .msg_iovlen */
};
#define CAPTURE_MSGHDR_IOV_OFFSET 16

/* Where the bytes of one call are: one buffer (iovcnt 0), or an iovec array of iovcnt entries. */
struct capture_src {
	__u64 buf;
	__u32 iovcnt;
};

static __always_inline void capture_count(__u32 slot, __u64 n)
{
	__u64 *c = verdict_counters.lookup(&slot);
	if (c)
		*c += n;
}

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

/* The first bytes of a call (first iovec for the vector calls), for the TLS check. */
static __always_inline int capture_peek(const struct capture_src *src, __u8 first[2])
{
	__u64 p = src->buf;
	if (src->iovcnt) {
		struct capture_iovec v;
		if (bpf_probe_read_user(&v, sizeof(v), (const void *)src->buf) || v.len < 2)
			return -1;
		p = v.base;
	}
	return bpf_probe_read_user(first, 2, (const void *)p);
}

/* A header-only record (GAP, TLS_HANDSHAKE); a full ring is counted. */
static __always_inline struct capture_event *capture_mark(const struct capture_sock_key *k,
							  const struct capture_sock *s, __u8 kind, __u8 dir,
							  __u8 flags, __u64 ts)
{
	struct capture_event *h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
	if (!h) {
		capture_count(COUNTER_CAPTURE_EVENTS_LOST, 1);
		return 0;
	}
	capture_header(h, k, s, kind, dir, flags, ts);
	return h;
}

/* Whether a syscall's bytes are copied at all: not for a socket flagged TLS (an SSL_* call used it: lib/tls.h, or its
 * first send was a TLS handshake record) or SKIP. The first send decides the handshake check. */
static __always_inline int capture_wanted(const struct capture_sock_key *k, struct capture_sock *s, __u8 dir,
					  const struct capture_src *src, __u64 total)
{
	tls_note_fd(k->fd, s);
	if (dir == CAPTURE_DIR_SEND && !(s->flags & CAPTURE_SOCK_F_SENT)) {
		__u8 first[2] = {};
		__u32 flags = s->flags | CAPTURE_SOCK_F_SENT;
		/* a TLS record: ContentType handshake (22), then the major version 3 (SSL 3.0 .. TLS 1.3) */
		if (!(flags & CAPTURE_SOCK_F_TLS) && total >= 2 && capture_peek(src, first) == 0 && first[0] == 0x16 &&
		    first[1] == 0x03) {
			flags |= CAPTURE_SOCK_F_TLS;
			capture_count(COUNTER_CAPTURE_TLS_SOCKETS, 1);
			struct capture_event *h = capture_mark(k, s, CAPTURE_KIND_TLS_HANDSHAKE, dir, 0,
							       bpf_ktime_get_ns());
			if (h) {
				h->total = total;
				capture_events.ringbuf_submit(h, BPF_RB_NO_WAKEUP);
			}
		}
		s->flags = flags;
	}
	if (s->flags & (CAPTURE_SOCK_F_TLS | CAPTURE_SOCK_F_SKIP)) {
		capture_count(COUNTER_CAPTURE_NOT_CAPTURED, 1);
		return 0;
	}
	return 1;
}

/* How many of this call's bytes the per-request budget still allows; a change of direction starts a new budget. */
static __always_inline __u64 capture_budget(struct capture_sock *s, __u8 dir, __u64 total)
{
	const struct runtime_config *cfg = config_get();
	__u64 budget = 0;
	if (cfg)
		budget = dir == CAPTURE_DIR_SEND ? cfg->capture_request_bytes : cfg->capture_response_bytes;
	if (s->direction != dir) {
		s->direction = dir;
		s->burst_bytes = 0;
	}
	__u64 used = s->burst_bytes;
	s->burst_bytes = used + total;
	if (used >= budget)
		return 0;
	return budget - used < total ? budget - used : total;
}

static __always_inline void capture_gap(const struct capture_sock_key *k, const struct capture_sock *s, __u8 dir,
					__u8 flags, __u64 ts, __u64 total, __u64 copied)
{
	capture_count(COUNTER_CAPTURE_TRUNCATED, 1);
	capture_count(COUNTER_CAPTURE_TRUNCATED_BYTES, total - copied);
	struct capture_event *h = capture_mark(k, s, CAPTURE_KIND_GAP, dir, flags, ts);
	if (!h)
		return;
	h->total = total;
	h->offset = copied;
	capture_events.ringbuf_submit(h, BPF_RB_NO_WAKEUP);
}

/* Copy what the budget allows of the `total` bytes a call moved, as a prefix: one buffer, or the iovecs in order.
 * One bounded loop; each turn copies one chunk of the current segment or steps to the next iovec. Where it is lives
 * in capture_cursor (this CPU), not in registers: the verifier does not follow values through map memory, so the
 * state at the top of every turn is the same but for the turn number, and verifying the loop costs one pass per
 * turn instead of one per combination of segment lengths. What is not copied, from the first byte missed to the
 * end of the call, is one GAP record. */
static __always_inline void capture_copy(const struct capture_sock_key *k, struct capture_sock *s, __u8 dir,
					 __u8 flags, const struct capture_src *src, __u64 total)
{
	__u32 zero = 0;
	struct capture_cursor *c = capture_cursor.lookup(&zero);
	if (!c)
		return;
	__u64 ts = bpf_ktime_get_ns();
	__u64 want = capture_budget(s, dir, total);
	c->seg = src->buf;
	c->seg_len = src->iovcnt ? 0 : want;   /* a vector call's first turn takes its first iovec */
	c->seg_off = 0;
	c->done = 0;
	c->iov = 0;
	for (__u32 i = 0; i < CAPTURE_CHUNKS_PER_CALL; i++) {
		/* volatile: read back from the map each turn (else the compiler carries them in registers) */
		__u64 done = *(volatile __u64 *)&c->done, seg_off = *(volatile __u64 *)&c->seg_off;
		__u64 seg_len = *(volatile __u64 *)&c->seg_len;
		if (done >= want)
			break;
		if (seg_off >= seg_len) {
			__u32 iov = *(volatile __u32 *)&c->iov;
			if (iov >= src->iovcnt || iov >= CAPTURE_IOVECS)
				break;
			struct capture_iovec v;
			if (bpf_probe_read_user(&v, sizeof(v), (const void *)(src->buf + (__u64)iov * sizeof(v)))) {
				capture_count(COUNTER_CAPTURE_READ_FAILED, 1);
				break;
			}
			c->iov = iov + 1;
			c->seg = v.base;
			c->seg_len = v.len < want - done ? v.len : want - done;
			c->seg_off = 0;
			continue;
		}
		__u64 n = seg_len - seg_off;
		if (n > CAPTURE_CHUNK)
			n = CAPTURE_CHUNK;
		struct capture_record *r = capture_events.ringbuf_reserve(sizeof(struct capture_record));
		if (!r) {
			capture_count(COUNTER_CAPTURE_EVENTS_LOST, 1);
			break;
		}
		capture_header(&r->h, k, s, CAPTURE_KIND_DATA, dir, flags, ts);
		r->h.total = total;
		r->h.offset = done;
		/* exactly n bytes: n is 0..CAPTURE_CHUNK on a 64-bit register, which this kernel's verifier accepts (a
		 * fixed CAPTURE_CHUNK read would copy past the caller's buffer and fault at the end of a mapping) */
		if (bpf_probe_read_user(r->data, n, (const void *)(*(volatile __u64 *)&c->seg + seg_off)) != 0) {
			capture_events.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
			capture_count(COUNTER_CAPTURE_READ_FAILED, 1);
			break;
		}
		r->h.len = n;
		capture_events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
		capture_count(COUNTER_CAPTURE_CHUNKS, 1);
		c->seg_off = seg_off + n;
		c->done = done + n;
	}
	__u64 copied = *(volatile __u64 *)&c->done;
	if (copied < total)
		capture_gap(k, s, dir, flags, ts, total, copied);
}

/* The syscall path: what a send or receive moved, unless the socket is TLS or skipped. */
static __always_inline void capture_syscall(const struct capture_sock_key *k, struct capture_sock *s, __u8 dir,
					    const struct capture_src *src, __u64 total)
{
	if (capture_wanted(k, s, dir, src, total))
		capture_copy(k, s, dir, 0, src, total);
}

/* bpf/tls.c: the plaintext an SSL_* call moved (flags CAPTURE_EV_F_TLS), unless the agent said skip. */
static __always_inline void capture_data(const struct capture_sock_key *k, struct capture_sock *s, __u8 dir,
					 __u8 flags, const __u8 *buf, __u64 total)
{
	if (s->flags & CAPTURE_SOCK_F_SKIP) {
		capture_count(COUNTER_CAPTURE_NOT_CAPTURED, 1);
		return;
	}
	struct capture_src src = { .buf = (__u64)buf, .iovcnt = 0 };
	capture_copy(k, s, dir, flags, &src, total);
}

static __always_inline int capture_send(__u32 fd, __u64 buf, __u32 iovcnt, __u64 count)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	if (!s || !count)
		return 0;
	struct capture_src src = { .buf = buf, .iovcnt = iovcnt };
	capture_syscall(&k, s, CAPTURE_DIR_SEND, &src, count);
	return 0;
}

/* The bytes a vector send moves: the sum of the first CAPTURE_IOVECS iovec lengths (the rest are a gap). */
static __always_inline __u64 capture_iov_total(__u64 vec, __u32 vlen)
{
	__u64 total = 0;
#pragma unroll
	for (__u32 i = 0; i < CAPTURE_IOVECS; i++) {
		if (i >= vlen)
			break;
		struct capture_iovec v;
		if (bpf_probe_read_user(&v, sizeof(v), (const void *)(vec + i * sizeof(v))))
			break;
		total += v.len;
	}
	return total;
}

static __always_inline int capture_sendv(__u32 fd, __u64 vec, __u64 vlen)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	if (!s || !vlen)
		return 0;
	__u32 n = vlen > 0xffff ? 0xffff : vlen;
	if (n > CAPTURE_IOVECS)
		capture_count(COUNTER_CAPTURE_TRUNCATED, 1);   /* iovecs past CAPTURE_IOVECS: not even their size is known */
	__u64 total = capture_iov_total(vec, n);
	if (!total)
		return 0;
	struct capture_src src = { .buf = vec, .iovcnt = n };
	capture_syscall(&k, s, CAPTURE_DIR_SEND, &src, total);
	return 0;
}

static __always_inline int capture_sendmsg(__u32 fd, __u64 msg)
{
	struct capture_sock_key k;
	if (!capture_find(fd, &k))
		return 0;
	struct capture_msg_iov m;
	if (bpf_probe_read_user(&m, sizeof(m), (const void *)(msg + CAPTURE_MSGHDR_IOV_OFFSET)))
		return 0;
	return capture_sendv(fd, m.iov, m.iovlen);
}

static __always_inline int capture_recv_enter(__u32 fd, __u64 buf, __u64 iovcnt)
{
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	if (!s)
		return 0;
	if (tls_note_fd(fd, s) || (s->flags & CAPTURE_SOCK_F_SKIP)) {
		capture_count(COUNTER_CAPTURE_NOT_CAPTURED, 1);
		return 0;
	}
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_read r = { .buf = buf, .fd = fd, .iovcnt = iovcnt > 0xffff ? 0xffff : iovcnt };
	capture_reads.update(&id, &r);
	return 0;
}

static __always_inline int capture_recvmsg_enter(__u32 fd, __u64 msg)
{
	struct capture_sock_key k;
	if (!capture_find(fd, &k))
		return 0;
	struct capture_msg_iov m;
	if (bpf_probe_read_user(&m, sizeof(m), (const void *)(msg + CAPTURE_MSGHDR_IOV_OFFSET)) || !m.iovlen)
		return 0;
	return capture_recv_enter(fd, m.iov, m.iovlen);
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
	if (s) {
		struct capture_src src = { .buf = r.buf, .iovcnt = r.iovcnt };
		capture_syscall(&k, s, CAPTURE_DIR_RECV, &src, ret);
	}
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
	v.flags = 0;
	v.direction = 0;
	v.burst_bytes = 0;
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

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return capture_send(args->fd, (__u64)args->buf, 0, args->count); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return capture_send(args->fd, (__u64)args->buff, 0, args->len); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return capture_sendv(args->fd, (__u64)args->vec, args->vlen); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return capture_sendmsg(args->fd, (__u64)args->msg); }
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return capture_recv_enter(args->fd, (__u64)args->buf, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return capture_recv_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return capture_recv_enter(args->fd, (__u64)args->ubuf, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return capture_recv_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{
	return args->vlen ? capture_recv_enter(args->fd, (__u64)args->vec, args->vlen) : 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return capture_recv_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return capture_recvmsg_enter(args->fd, (__u64)args->msg); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return capture_recv_exit(args->ret); }
