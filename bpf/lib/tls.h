/* TLS capture, syscall side: join an OpenSSL call (bpf/tls.c) to the socket its send/receive syscall uses. */
#ifndef AIMESH_LIB_TLS_H
#define AIMESH_LIB_TLS_H

/* Called by the send/receive tracepoints of bpf/capture.c for a marked capture socket. When this thread is inside an
 * SSL_* call, the call's socket is fd: note it in the call (the uretprobe copies the plaintext there), remember it for
 * the SSL object (an SSL_read served from OpenSSL's buffer makes no syscall), and mark the socket TLS.
 * Returns nonzero when the socket is TLS: its syscall bytes are ciphertext and are not copied. */
static __always_inline int tls_note_fd(__u32 fd, struct capture_sock *s)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_call *c = tls_calls.lookup(&id);
	if (c) {
		c->fd = fd;
		c->has_fd = 1;
		struct tls_ssl_key k = { .ssl = c->ssl, .tgid = id >> 32 };
		tls_ssl_fd.update(&k, &fd);
		s->flags |= CAPTURE_SOCK_F_TLS;
	}
	return s->flags & CAPTURE_SOCK_F_TLS;
}

#endif
