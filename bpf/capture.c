/* Plaintext capture: two raw tracepoints copy what a marked client socket sends and receives into capture_events.
 *
 *   raw_tracepoint/sys_enter   dispatch on the syscall number (x86-64), every other syscall leaves at one compare:
 *     connect                  (tgid, fd) of a connect the connect hook marked -> capture_connect
 *     close                    forget (tgid, fd), tell the agent (a CLOSE record)
 *   raw_tracepoint/sys_exit    (the number from pt_regs.orig_ax, the return value from args[1], the arguments from
 *                              pt_regs: unchanged since the entry)
 *     connect                  capture_connect -> capture_sockets when it succeeded; an OPEN record (the address
 *                              as dialed)
 *     write/sendto/writev/sendmsg, read/recvfrom/readv/recvmsg   copy the ret bytes the call moved (a vector call:
 *                              across the first CAPTURE_IOVECS iovecs), so a send's size is exact like a receive's
 * These programs are an optional group (agent/kernel/registry.py group "capture"): the agent links them only while
 * the live policy generation has CFG_F_LLM_CAPTURE, so with no capture identity no syscall on the node pays. While
 * linked, every syscall pays the compare (the exit one pt_regs read), and every send or receive that is not on a
 * marked socket one capture_sockets lookup, at its exit.
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
 *   reads: runtime_config, capture_sockets, capture_connect
 *   writes: capture_connect, capture_sockets, capture_events, verdict_counters
 */
#include "programs.h"
#include "lib/tls.h"

#define CAPTURE_EINPROGRESS 115

/* Data bytes of the three record sizes of capture_events (never more than CAPTURE_CHUNK). */
#define CAPTURE_CLASS_S (CAPTURE_CHUNK < 256 ? CAPTURE_CHUNK : 256)
#define CAPTURE_CLASS_M (CAPTURE_CHUNK < 1024 ? CAPTURE_CHUNK : 1024)

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

/* Fill a reserved record's header. It takes the socket's lost byte counts with it (the agent makes them holes before
 * this record); capture_unheader gives them back when the record is discarded. */
static __always_inline void capture_header(struct capture_event *h, const struct capture_sock_key *k,
					   struct capture_sock *s, __u8 kind, __u8 dir, __u8 flags, __u64 ts)
{
	h->lost_send = s->lost_send;
	h->lost_recv = s->lost_recv;
	s->lost_send = 0;
	s->lost_recv = 0;
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

static __always_inline void capture_unheader(const struct capture_event *h, struct capture_sock *s)
{
	s->lost_send += h->lost_send;
	s->lost_recv += h->lost_recv;
}

/* Bytes of one call that no record will tell of (their chunks and their GAP record were dropped by the full ring):
 * the socket's next record carries them. */
static __always_inline void capture_lost(struct capture_sock *s, __u8 dir, __u64 n)
{
	capture_count(COUNTER_CAPTURE_LOST_BYTES, n);
	if (dir == CAPTURE_DIR_SEND)
		s->lost_send += n;
	else
		s->lost_recv += n;
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
							  struct capture_sock *s, __u8 kind, __u8 dir,
							  __u8 flags, __u64 ts)
{
	struct capture_event *h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
	if (!h)   /* retries: a reservation can fail with room to spare under cross-CPU contention (see flow_reserve) */
		h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
	if (!h)
		h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
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

static __always_inline void capture_gap(const struct capture_sock_key *k, struct capture_sock *s, __u8 dir,
					__u8 flags, __u64 ts, __u64 total, __u64 copied)
{
	capture_count(COUNTER_CAPTURE_TRUNCATED, 1);
	capture_count(COUNTER_CAPTURE_TRUNCATED_BYTES, total - copied);
	struct capture_event *h = capture_mark(k, s, CAPTURE_KIND_GAP, dir, flags, ts);
	if (!h) {
		capture_lost(s, dir, total - copied);
		return;
	}
	h->total = total;
	h->offset = copied;
	capture_events.ringbuf_submit(h, BPF_RB_NO_WAKEUP);
}

#define CAPTURE_ERR_LOST 1
#define CAPTURE_ERR_READ 2

/* One DATA record of n (1..size) bytes at user address p, in a record of `size` data bytes: size is a constant in
 * each caller (its own reserve and its own bounded read, verified apart). */
static __always_inline int capture_chunk_sized(const struct capture_sock_key *k, struct capture_sock *s,
					       __u8 dir, __u8 flags, __u64 ts, __u64 total, __u64 offset, __u64 p,
					       __u64 n, const __u32 size)
{
	struct capture_event *h = capture_events.ringbuf_reserve(sizeof(struct capture_event) + size);
	if (!h)   /* retries, as in capture_mark */
		h = capture_events.ringbuf_reserve(sizeof(struct capture_event) + size);
	if (!h)
		h = capture_events.ringbuf_reserve(sizeof(struct capture_event) + size);
	if (!h)
		return CAPTURE_ERR_LOST;
	if (n > size)
		n = size;
	capture_header(h, k, s, CAPTURE_KIND_DATA, dir, flags, ts);
	h->total = total;
	h->offset = offset;
	/* exactly n bytes: n is 0..size on a 64-bit register, which this kernel's verifier accepts (a fixed-size read
	 * would copy past the caller's buffer and fault at the end of a mapping) */
	if (bpf_probe_read_user((__u8 *)(h + 1), n, (const void *)p) != 0) {
		capture_unheader(h, s);
		capture_events.ringbuf_discard(h, BPF_RB_NO_WAKEUP);
		return CAPTURE_ERR_READ;
	}
	h->len = n;
	capture_events.ringbuf_submit(h, BPF_RB_NO_WAKEUP);
	return 0;
}

/* Ring space by size class: a record reserves the smallest of CAPTURE_CLASS_S, CAPTURE_CLASS_M and CAPTURE_CHUNK
 * data bytes that holds the chunk, so a 200-byte SSE event takes 256 + the header, not a whole chunk. */
static __always_inline int capture_chunk_out(const struct capture_sock_key *k, struct capture_sock *s,
					     __u8 dir, __u8 flags, __u64 ts, __u64 total, __u64 offset, __u64 p,
					     __u64 n)
{
	if (n <= CAPTURE_CLASS_S)
		return capture_chunk_sized(k, s, dir, flags, ts, total, offset, p, n, CAPTURE_CLASS_S);
	if (n <= CAPTURE_CLASS_M)
		return capture_chunk_sized(k, s, dir, flags, ts, total, offset, p, n, CAPTURE_CLASS_M);
	return capture_chunk_sized(k, s, dir, flags, ts, total, offset, p, n, CAPTURE_CHUNK);
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
		int err = capture_chunk_out(k, s, dir, flags, ts, total, done,
					    *(volatile __u64 *)&c->seg + seg_off, n);
		if (err) {
			capture_count(err == CAPTURE_ERR_LOST ? COUNTER_CAPTURE_EVENTS_LOST : COUNTER_CAPTURE_READ_FAILED, 1);
			break;
		}
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

/* ---- the two raw tracepoints: every syscall of every task passes here while the group is linked ---- */

/* x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) of the calls capture looks at. */
#define SYS_READ      0
#define SYS_WRITE     1
#define SYS_CLOSE     3
#define SYS_READV    19
#define SYS_WRITEV   20
#define SYS_CONNECT  42
#define SYS_SENDTO   44
#define SYS_RECVFROM 45
#define SYS_SENDMSG  46
#define SYS_RECVMSG  47
/* The calls whose exit is looked at: a send's or receive's byte count is known there, a connect's outcome too. */
#define CAPTURE_EXITS_MASK ((1ULL << SYS_READ) | (1ULL << SYS_WRITE) | (1ULL << SYS_READV) | (1ULL << SYS_WRITEV) | \
			    (1ULL << SYS_CONNECT) | (1ULL << SYS_SENDTO) | (1ULL << SYS_RECVFROM) | \
			    (1ULL << SYS_SENDMSG) | (1ULL << SYS_RECVMSG))

/* Offsets in the kernel's struct pt_regs (arch/x86/include/asm/ptrace.h) of the syscall arguments (di, si, dx: the
 * first three) and of orig_ax (the syscall number, kept there for the exit). */
#define PT_REGS_OFF_DX      96
#define PT_REGS_OFF_SI     104
#define PT_REGS_OFF_DI     112
#define PT_REGS_OFF_ORIG_AX 120

static __always_inline __u64 capture_reg(__u64 regs, __u32 off)
{
	__u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (const void *)(regs + off));
	return v;
}

static __always_inline int capture_connect_enter(__u32 fd)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg || !(cfg->flags & CFG_F_LLM_CAPTURE))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_sock c = {};
	c.fd = fd;
	capture_connect.update(&id, &c);
	return 0;
}

static __always_inline int capture_connect_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct capture_sock *c = capture_connect.lookup(&id);
	if (!c)
		return 0;
	struct capture_sock v = *c;
	capture_connect.delete(&id);
	struct capture_sock_key k = { .tgid = id >> 32, .fd = v.fd };
	if (!v.ready || (ret != 0 && ret != -CAPTURE_EINPROGRESS)) {
		capture_sockets.delete(&k);   /* an fd dup2'ed over a captured one is not that socket any more */
		return 0;
	}
	v.ready = 0;
	v.flags = 0;
	v.direction = 0;
	v.burst_bytes = 0;
	v.lost_send = 0;
	v.lost_recv = 0;
	if (capture_sockets.update(&k, &v)) {
		counter_add(COUNTER_CAPTURE_SOCKETS_FULL);
		return 0;
	}
	/* the address as dialed, for the agent's records (server.address/port); lost to a full ring: counted */
	struct capture_open_record {
		struct capture_event h;
		struct capture_open o;
	} *r = capture_events.ringbuf_reserve(sizeof(struct capture_open_record));
	if (!r)   /* one retry, as in capture_mark */
		r = capture_events.ringbuf_reserve(sizeof(struct capture_open_record));
	if (!r) {
		counter_add(COUNTER_CAPTURE_EVENTS_LOST);
		return 0;
	}
	capture_header(&r->h, &k, &v, CAPTURE_KIND_OPEN, 0, 0, bpf_ktime_get_ns());
	r->h.len = sizeof(r->o);
	__builtin_memcpy(r->o.addr, v.dialed_addr, 16);
	r->o.port = v.dialed_port;
	__builtin_memset(r->o.pad, 0, sizeof(r->o.pad));
	capture_events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
	return 0;
}

static __always_inline int capture_close(const struct capture_sock_key *k, struct capture_sock *s)
{
	struct capture_event *h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
	if (!h)   /* one retry, as in capture_mark */
		h = capture_events.ringbuf_reserve(sizeof(struct capture_event));
	if (h) {
		capture_header(h, k, s, CAPTURE_KIND_CLOSE, 0, s->flags & CAPTURE_SOCK_F_TLS ? CAPTURE_EV_F_TLS : 0,
			       bpf_ktime_get_ns());
		capture_events.ringbuf_submit(h, BPF_RB_NO_WAKEUP);
	} else {
		counter_add(COUNTER_CAPTURE_EVENTS_LOST);
	}
	capture_sockets.delete(k);
	return 0;
}

/* A send or receive returned `ret` bytes: if its fd is a marked socket (one capture_sockets lookup for any other),
 * copy them. The arguments are read back from the caller's pt_regs (di, si, dx hold them until the return to user
 * space), so nothing is kept between enter and exit: the exact count is known only here, for a send as for a
 * receive (a partial send copies what the kernel took; the application sends the rest again). */
static __always_inline int capture_io_exit(__u64 regs, __u64 nr, long ret)
{
	if (ret <= 0)
		return 0;
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(capture_reg(regs, PT_REGS_OFF_DI), &k);
	if (!s)
		return 0;
	struct capture_src src = { .buf = capture_reg(regs, PT_REGS_OFF_SI), .iovcnt = 0 };
	if (nr == SYS_SENDMSG || nr == SYS_RECVMSG) {
		struct capture_msg_iov m;
		if (bpf_probe_read_user(&m, sizeof(m), (const void *)(src.buf + CAPTURE_MSGHDR_IOV_OFFSET)) || !m.iovlen)
			return 0;
		src.buf = m.iov;
		src.iovcnt = m.iovlen > 0xffff ? 0xffff : m.iovlen;
	} else if (nr == SYS_WRITEV || nr == SYS_READV) {
		__u64 vlen = capture_reg(regs, PT_REGS_OFF_DX);
		if (!vlen)
			return 0;
		src.iovcnt = vlen > 0xffff ? 0xffff : vlen;
	}
	__u8 dir = nr == SYS_WRITE || nr == SYS_SENDTO || nr == SYS_WRITEV || nr == SYS_SENDMSG ? CAPTURE_DIR_SEND
												 : CAPTURE_DIR_RECV;
	capture_syscall(&k, s, dir, &src, ret);
	return 0;
}

/* raw_tracepoint/sys_enter: args[0] the caller's struct pt_regs, args[1] the syscall number. Every syscall but
 * connect and close leaves at the first compare. */
int aimesh_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 nr = ctx->args[1];
	if (nr != SYS_CONNECT && nr != SYS_CLOSE)
		return 0;
	__u32 fd = capture_reg(ctx->args[0], PT_REGS_OFF_DI);
	if (nr == SYS_CONNECT)
		return capture_connect_enter(fd);
	/* at the entry, while the fd still names the socket: after it another thread may reuse the number */
	struct capture_sock_key k;
	struct capture_sock *s = capture_find(fd, &k);
	return s ? capture_close(&k, s) : 0;
}

/* raw_tracepoint/sys_exit: args[0] the struct pt_regs (orig_ax: the syscall number), args[1] the return value. Every
 * syscall but connect and the eight sends and receives leaves at the first compare. */
int aimesh_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 regs = ctx->args[0];
	__u64 nr = capture_reg(regs, PT_REGS_OFF_ORIG_AX);
	if (nr > SYS_RECVMSG || !((1ULL << nr) & CAPTURE_EXITS_MASK))
		return 0;
	long ret = ctx->args[1];
	if (nr == SYS_CONNECT)
		return capture_connect_exit(ret);
	return capture_io_exit(regs, nr, ret);
}
