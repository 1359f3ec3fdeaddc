/* aimesh-lg: a small TCP load generator for bench/ (compiled at bench time with the machine's cc).
 *
 *   aimesh-lg server HOST PORT              listen; per connection: echo until EOF/reset, then close. A connection
 *                                           that starts with the bulk header (below) is a sink instead. Prints
 *                                           "ready" once listening; runs until killed.
 *   aimesh-lg rr  HOST PORT N SIZE WARMUP   one connection, WARMUP + N ping-pongs of SIZE bytes (TCP_NODELAY);
 *                                           prints one JSON line with the round-trip median/p99/mean of the N.
 *   aimesh-lg crr HOST PORT N WARMUP        WARMUP + N times: socket(), connect(), close() with SO_LINGER 0 (a RST,
 *                                           so no TIME_WAIT eats the ephemeral ports); prints one JSON line with the
 *                                           rate over the N and the per-iteration median/p99.
 *   aimesh-lg crate HOST PORT N RATE        N times connect()+close(RST) as above, paced open loop at RATE per
 *                                           second (connection i starts at t0 + i/RATE, at once when late; RATE 0:
 *                                           as fast as possible); prints the achieved rate.
 *   aimesh-lg bulk HOST PORT BYTES          one connection: a 16-byte header ("AIMESHB1" + BYTES as a native
 *                                           uint64), then BYTES one way in 128 KiB writes; the server counts them and
 *                                           answers 8 bytes once all arrived. Prints MB/s (10^6 B) from the first
 *                                           write to that answer.
 *
 *   aimesh-lg pipe N SIZE WARMUP            two processes, two pipes: WARMUP + N ping-pongs of SIZE bytes through
 *                                           write()/read(); prints the round-trip JSON line of rr ("mode": "pipe").
 *   aimesh-lg llmserver HOST PORT CHUNKS    a fast OpenAI-compatible chat server for bench/calls.py: one process per
 *                                           connection (keep-alive, requests in order); every POST with a
 *                                           Content-Length body is answered with one pre-built SSE stream of CHUNKS
 *                                           content chunks, a finish chunk, a usage chunk and [DONE], chunked, in
 *                                           one write; a body without `"stream": true` gets one pre-built
 *                                           chat.completion JSON object (Content-Length) instead. Prints "ready"
 *                                           once listening.
 *   aimesh-lg llmcalls HOST PORT CONNS N RATE BODY
 *                                           N streamed chat calls (`POST /v1/chat/completions`, one pre-built
 *                                           request of BODY bytes, headers and body in one write, `model` after
 *                                           `messages` as openai-python sends it) over CONNS keep-alive connections
 *                                           taken in turn, each call read to its last chunk before the next; paced
 *                                           open loop at RATE calls/s (0: as fast as it goes). Prints the rate.
 *   aimesh-lg llmload HOST PORT CONNS N RATE STREAM BODY WARMUP
 *                                           WARMUP + N chat calls (STREAM 1: streamed, 0: non-streamed JSON) over
 *                                           CONNS keep-alive connections, several in flight (epoll): open loop, call
 *                                           i is due at t0 + i/RATE and goes out on the first idle connection (RATE
 *                                           0: closed loop, every connection busy all the time: saturation).
 *                                           Latency is measured from the due time (queueing on a late path counts,
 *                                           no coordinated omission); time to first chunk from the due time to the
 *                                           first `data:` of the body. Prints rate, median/p99 of both, non-200s.
 *
 * Loopback only in bench/, but any HOST the kernel accepts works. Exit status 0 on success, 1 on any error (the
 * message names the failing call and errno, e.g. "connect: Operation not permitted" when a policy denies it).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 65536
#define BULK_CHUNK (128 * 1024)
static const char BULK_MAGIC[8] = { 'A', 'I', 'M', 'E', 'S', 'H', 'B', '1' };

static int fail(const char *what)
{
	fprintf(stderr, "aimesh-lg: %s: %s\n", what, strerror(errno));
	return 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int parse_addr(const char *host, const char *port, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)atoi(port));
	if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) {
		fprintf(stderr, "aimesh-lg: %s is not an IPv4 address\n", host);
		return -1;
	}
	return 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* Sorts s in place; the nearest-rank percentile p (0..100). */
static double percentile_us(uint64_t *s, long n, double p)
{
	long i = (long)((p / 100.0) * (double)n + 0.5) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return (double)s[i] / 1000.0;
}

static double mean_us(const uint64_t *s, long n)
{
	double sum = 0;
	for (long i = 0; i < n; i++)
		sum += (double)s[i];
	return sum / (double)n / 1000.0;
}

static int full_io(int fd, char *buf, long len, int writing)
{
	long done = 0;
	while (done < len) {
		ssize_t r = writing ? write(fd, buf + done, len - done) : read(fd, buf + done, len - done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		done += r;
	}
	return 0;
}

/* A bulk connection: buf holds `have` >= 16 bytes, the header first. Reads until the announced count arrived (or
 * EOF), answers that count as 8 bytes, then waits for the client to close. */
static void sink(int c, char *buf, long have)
{
	uint64_t want, got = (uint64_t)(have - 16);
	memcpy(&want, buf + 8, sizeof(want));
	while (got < want) {
		ssize_t r = read(c, buf, MAX_SIZE);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return;
		got += (uint64_t)r;
	}
	if (full_io(c, (char *)&got, sizeof(got), 1) < 0)
		return;
	while (read(c, buf, MAX_SIZE) > 0)
		;
}

static int serve(struct sockaddr_in *sa)
{
	int one = 1;
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	if (ls < 0)
		return fail("socket");
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)sa, sizeof(*sa)) < 0)
		return fail("bind");
	if (listen(ls, 4096) < 0)
		return fail("listen");
	printf("ready\n");
	fflush(stdout);
	static char buf[MAX_SIZE];
	for (;;) {
		int c = accept(ls, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return fail("accept");
		}
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		long have = 0;
		for (;;) {
			ssize_t r = read(c, buf + have, sizeof(buf) - have);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				break;
			have += r;
			if (have >= 0 && have < 16 && !memcmp(buf, BULK_MAGIC, have < 8 ? have : 8))
				continue;   /* may be a bulk header still arriving */
			if (have >= 16 && !memcmp(buf, BULK_MAGIC, 8)) {
				sink(c, buf, have);
				break;
			}
			if (full_io(c, buf, have, 1) < 0)
				break;
			have = 0;
		}
		close(c);
	}
}

static int rr(struct sockaddr_in *sa, long n, long size, long warmup)
{
	int one = 1;
	if (size < 1 || size > MAX_SIZE || n < 1)
		return fprintf(stderr, "aimesh-lg: rr needs N >= 1 and 1 <= SIZE <= %d\n", MAX_SIZE), 1;
	uint64_t *s = calloc((size_t)n, sizeof(*s));
	static char buf[MAX_SIZE];
	memset(buf, 'x', sizeof(buf));
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || !s)
		return fail("socket");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)sa, sizeof(*sa)) < 0)
		return fail("connect");
	for (long i = 0; i < warmup; i++)
		if (full_io(fd, buf, size, 1) < 0 || full_io(fd, buf, size, 0) < 0)
			return fail("warmup ping-pong");
	uint64_t start = now_ns();
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		if (full_io(fd, buf, size, 1) < 0 || full_io(fd, buf, size, 0) < 0)
			return fail("ping-pong");
		s[i] = now_ns() - t0;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	close(fd);
	double mean = mean_us(s, n);
	qsort(s, (size_t)n, sizeof(*s), cmp_u64);
	printf("{\"mode\": \"rr\", \"n\": %ld, \"size\": %ld, \"median_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f, "
	       "\"min_us\": %.3f, \"elapsed_s\": %.6f}\n",
	       n, size, percentile_us(s, n, 50), percentile_us(s, n, 99), mean, (double)s[0] / 1000.0, elapsed);
	free(s);
	return 0;
}

static int connect_close(struct sockaddr_in *sa)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket");
	if (connect(fd, (struct sockaddr *)sa, sizeof(*sa)) < 0)
		return fail("connect");
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
	return 0;
}

static int crr(struct sockaddr_in *sa, long n, long warmup)
{
	if (n < 1)
		return fprintf(stderr, "aimesh-lg: crr needs N >= 1\n"), 1;
	uint64_t *s = calloc((size_t)n, sizeof(*s));
	if (!s)
		return fail("calloc");
	for (long i = 0; i < warmup; i++)
		if (connect_close(sa))
			return 1;
	uint64_t start = now_ns();
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		if (connect_close(sa))
			return 1;
		s[i] = now_ns() - t0;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	double mean = mean_us(s, n);
	qsort(s, (size_t)n, sizeof(*s), cmp_u64);
	printf("{\"mode\": \"crr\", \"n\": %ld, \"rate_per_s\": %.1f, \"median_us\": %.3f, \"p99_us\": %.3f, "
	       "\"mean_us\": %.3f, \"elapsed_s\": %.6f}\n",
	       n, (double)n / elapsed, percentile_us(s, n, 50), percentile_us(s, n, 99), mean, elapsed);
	free(s);
	return 0;
}

static int crate(struct sockaddr_in *sa, long n, double rate)
{
	if (n < 1 || rate < 0)
		return fprintf(stderr, "aimesh-lg: crate needs N >= 1 and RATE >= 0\n"), 1;
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);   /* sleep to the microsecond, not the default 50 us */
	uint64_t start = now_ns(), late = 0;
	for (long i = 0; i < n; i++) {
		if (rate > 0) {
			uint64_t due = start + (uint64_t)((double)i * 1e9 / rate), now = now_ns();
			if (now < due) {
				struct timespec ts = { .tv_sec = (time_t)(due / 1000000000ull),
						       .tv_nsec = (long)(due % 1000000000ull) };
				while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
					;
			} else if (now - due > 1000000) {
				late++;   /* started more than 1 ms after its slot */
			}
		}
		if (connect_close(sa))
			return 1;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	printf("{\"mode\": \"crate\", \"n\": %ld, \"target_per_s\": %.1f, \"rate_per_s\": %.1f, \"late_1ms\": %llu, "
	       "\"elapsed_s\": %.6f}\n",
	       n, rate, (double)n / elapsed, (unsigned long long)late, elapsed);
	return 0;
}

static int bulk(struct sockaddr_in *sa, uint64_t total)
{
	static char buf[BULK_CHUNK];
	char header[16];
	uint64_t ack = 0;
	if (total < 1)
		return fprintf(stderr, "aimesh-lg: bulk needs BYTES >= 1\n"), 1;
	memset(buf, 'b', sizeof(buf));
	memcpy(header, BULK_MAGIC, 8);
	memcpy(header + 8, &total, 8);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket");
	if (connect(fd, (struct sockaddr *)sa, sizeof(*sa)) < 0)
		return fail("connect");
	uint64_t start = now_ns();
	if (full_io(fd, header, sizeof(header), 1) < 0)
		return fail("bulk header");
	for (uint64_t sent = 0; sent < total;) {
		long n = total - sent < BULK_CHUNK ? (long)(total - sent) : BULK_CHUNK;
		if (full_io(fd, buf, n, 1) < 0)
			return fail("bulk write");
		sent += (uint64_t)n;
	}
	if (full_io(fd, (char *)&ack, sizeof(ack), 0) < 0)
		return fail("bulk answer");
	double elapsed = (double)(now_ns() - start) / 1e9;
	close(fd);
	if (ack != total)
		return fprintf(stderr, "aimesh-lg: server counted %llu of %llu bytes\n", (unsigned long long)ack,
			       (unsigned long long)total), 1;
	printf("{\"mode\": \"bulk\", \"bytes\": %llu, \"mb_per_s\": %.1f, \"elapsed_s\": %.6f}\n",
	       (unsigned long long)total, (double)total / elapsed / 1e6, elapsed);
	return 0;
}

/* ---- pipe ping-pong ---- */

static int pipe_rr(long n, long size, long warmup)
{
	int there[2], back[2];
	if (size < 1 || size > MAX_SIZE || n < 1)
		return fprintf(stderr, "aimesh-lg: pipe needs N >= 1 and 1 <= SIZE <= %d\n", MAX_SIZE), 1;
	if (pipe(there) < 0 || pipe(back) < 0)
		return fail("pipe");
	static char buf[MAX_SIZE];
	memset(buf, 'p', sizeof(buf));
	pid_t child = fork();
	if (child < 0)
		return fail("fork");
	if (child == 0) {           /* the echo end: read SIZE, write it back, until EOF */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(there[1]);
		close(back[0]);
		while (full_io(there[0], buf, size, 0) == 0 && full_io(back[1], buf, size, 1) == 0)
			;
		_exit(0);
	}
	close(there[0]);
	close(back[1]);
	uint64_t *s = calloc((size_t)n, sizeof(*s));
	if (!s)
		return fail("calloc");
	for (long i = 0; i < warmup; i++)
		if (full_io(there[1], buf, size, 1) < 0 || full_io(back[0], buf, size, 0) < 0)
			return fail("warmup pipe ping-pong");
	uint64_t start = now_ns();
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		if (full_io(there[1], buf, size, 1) < 0 || full_io(back[0], buf, size, 0) < 0)
			return fail("pipe ping-pong");
		s[i] = now_ns() - t0;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	close(there[1]);
	waitpid(child, NULL, 0);
	double mean = mean_us(s, n);
	qsort(s, (size_t)n, sizeof(*s), cmp_u64);
	printf("{\"mode\": \"pipe\", \"n\": %ld, \"size\": %ld, \"median_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f, "
	       "\"min_us\": %.3f, \"elapsed_s\": %.6f}\n",
	       n, size, percentile_us(s, n, 50), percentile_us(s, n, 99), mean, (double)s[0] / 1000.0, elapsed);
	free(s);
	return 0;
}

/* ---- a fast OpenAI-compatible streaming server and its client ---- */

#define LLM_BUF (256 * 1024)
#define LLM_MODEL "bench-llm"

static void sse_chunk(char *out, long *len, const char *data)
{
	char ev[512];
	int n = snprintf(ev, sizeof(ev), "data: %s\n\n", data);
	*len += sprintf(out + *len, "%x\r\n%s\r\n", n, ev);
}

/* The whole response to one call: headers, then CHUNKS content chunks, finish, usage, [DONE], end of chunks. */
static long llm_response(char *out, int chunks)
{
	char data[400];
	long len = sprintf(out, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
			   "Cache-Control: no-cache\r\n\r\n");
	const char *base = "\"id\": \"chatcmpl-b\", \"object\": \"chat.completion.chunk\", \"created\": 1, "
			   "\"model\": \"" LLM_MODEL "-served\"";
	for (int i = 0; i < chunks; i++) {
		snprintf(data, sizeof(data), "{%s, \"choices\": [{\"index\": 0, \"delta\": {\"content\": \" tok%d\"}, "
			 "\"logprobs\": null, \"finish_reason\": null}]}", base, i);
		sse_chunk(out, &len, data);
	}
	snprintf(data, sizeof(data), "{%s, \"choices\": [{\"index\": 0, \"delta\": {}, \"logprobs\": null, "
		 "\"finish_reason\": \"stop\"}]}", base);
	sse_chunk(out, &len, data);
	snprintf(data, sizeof(data), "{%s, \"choices\": [], \"usage\": {\"prompt_tokens\": 700, \"completion_tokens\": "
		 "%d, \"total_tokens\": %d}}", base, chunks, 700 + chunks);
	sse_chunk(out, &len, data);
	sse_chunk(out, &len, "[DONE]");
	len += sprintf(out + len, "0\r\n\r\n");
	return len;
}

/* The non-streamed answer: one chat.completion object with its usage. */
static long llm_json_response(char *out)
{
	char body[600];
	int n = snprintf(body, sizeof(body), "{\"id\": \"chatcmpl-b\", \"object\": \"chat.completion\", \"created\": 1, "
			 "\"model\": \"" LLM_MODEL "-served\", \"choices\": [{\"index\": 0, \"message\": {\"role\": "
			 "\"assistant\", \"content\": \"hello from the bench upstream\"}, \"logprobs\": null, "
			 "\"finish_reason\": \"stop\"}], \"usage\": {\"prompt_tokens\": 700, \"completion_tokens\": 6, "
			 "\"total_tokens\": 706}}");
	return sprintf(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", n, body);
}

/* Does the request (head + body, len bytes) ask for a stream? */
static int wants_stream(const char *req, long len)
{
	static const char *spaced = "\"stream\": true", *tight = "\"stream\":true";
	return memmem(req, (size_t)len, spaced, strlen(spaced)) != NULL ||
	       memmem(req, (size_t)len, tight, strlen(tight)) != NULL;
}

/* Length of the first complete request in buf (headers + Content-Length body), 0 while incomplete. */
static long request_len(const char *buf, long have)
{
	const char *end = memmem(buf, (size_t)have, "\r\n\r\n", 4);
	if (!end)
		return 0;
	long head = end - buf + 4, body = 0;
	const char *cl = memmem(buf, (size_t)head, "\r\nContent-Length:", 17);
	if (!cl)
		cl = memmem(buf, (size_t)head, "\r\ncontent-length:", 17);
	if (cl)
		body = atol(cl + 17);
	return have >= head + body ? head + body : 0;
}

static void llm_conn(int c, const char *resp, long resp_len, const char *json, long json_len)
{
	static char buf[LLM_BUF];
	long have = 0;
	for (;;) {
		long n;
		while ((n = request_len(buf, have)) > 0) {
			int s = wants_stream(buf, n);
			if (full_io(c, (char *)(s ? resp : json), s ? resp_len : json_len, 1) < 0)
				return;
			memmove(buf, buf + n, (size_t)(have - n));
			have -= n;
		}
		if (have == LLM_BUF)
			return;      /* a request larger than the buffer: not ours */
		ssize_t r = read(c, buf + have, LLM_BUF - have);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return;
		have += r;
	}
}

static int llm_serve(struct sockaddr_in *sa, int chunks)
{
	int one = 1;
	static char resp[64 * 1024], json[2048];
	if (chunks < 1 || chunks > 100)
		return fprintf(stderr, "aimesh-lg: llmserver needs 1 <= CHUNKS <= 100\n"), 1;
	long resp_len = llm_response(resp, chunks), json_len = llm_json_response(json);
	signal(SIGCHLD, SIG_IGN);   /* connection processes reap themselves */
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	if (ls < 0)
		return fail("socket");
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)sa, sizeof(*sa)) < 0)
		return fail("bind");
	if (listen(ls, 4096) < 0)
		return fail("listen");
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		int c = accept(ls, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return fail("accept");
		}
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		pid_t p = fork();
		if (p == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);   /* killing the server ends its connections */
			close(ls);
			llm_conn(c, resp, resp_len, json, json_len);
			_exit(0);
		}
		close(c);
	}
}

/* The request: openai-python's headers and a chat body of `body` bytes, `model` after `messages`. */
static long llm_request_kind(char *out, long cap, long body, int stream)
{
	const char *pre = "{\"messages\": [{\"role\": \"user\", \"content\": \"";
	const char *post = stream ? "\"}], \"model\": \"" LLM_MODEL "\", \"stream\": true, \"stream_options\": "
				    "{\"include_usage\": true}}"
				  : "\"}], \"model\": \"" LLM_MODEL "\", \"max_tokens\": 64}";
	long fill = body - (long)strlen(pre) - (long)strlen(post);
	if (fill < 0 || body + 512 > cap)
		return -1;
	long len = sprintf(out, "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n"
			   "Content-Type: application/json\r\nUser-Agent: aimesh-lg\r\nAuthorization: Bearer sk-bench\r\n"
			   "Content-Length: %ld\r\n\r\n%s", body, pre);
	for (long i = 0; i < fill; i++)
		out[len++] = (i % 6 == 5) ? ' ' : 'w';
	len += sprintf(out + len, "%s", post);
	return len;
}

static long llm_request(char *out, long cap, long body)
{
	return llm_request_kind(out, cap, body, 1);
}

/* Read one chunked response to its terminating chunk; 0 when whole. */
static int llm_read_response(int fd, char *buf, long cap)
{
	long have = 0;
	for (;;) {
		ssize_t r = read(fd, buf + have, cap - have);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		have += r;
		if (have >= 5 && !memcmp(buf + have - 5, "0\r\n\r\n", 5))
			return 0;
		if (have == cap)
			have = 0;   /* keep only the tail we look at */
	}
}

static int llm_calls(struct sockaddr_in *sa, long conns, long n, double rate, long body)
{
	static char req[LLM_BUF], buf[LLM_BUF];
	int one = 1;
	if (conns < 1 || conns > 1024 || n < 1 || rate < 0)
		return fprintf(stderr, "aimesh-lg: llmcalls needs 1 <= CONNS <= 1024, N >= 1, RATE >= 0\n"), 1;
	long req_len = llm_request(req, sizeof(req), body);
	if (req_len < 0)
		return fprintf(stderr, "aimesh-lg: llmcalls needs 200 <= BODY <= %d\n", LLM_BUF - 512), 1;
	int *fds = calloc((size_t)conns, sizeof(int));
	uint64_t *s = calloc((size_t)n, sizeof(*s));
	if (!fds || !s)
		return fail("calloc");
	for (long i = 0; i < conns; i++) {
		fds[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (fds[i] < 0)
			return fail("socket");
		setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (connect(fds[i], (struct sockaddr *)sa, sizeof(*sa)) < 0)
			return fail("connect");
	}
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	uint64_t start = now_ns(), late = 0;
	for (long i = 0; i < n; i++) {
		if (rate > 0) {
			uint64_t due = start + (uint64_t)((double)i * 1e9 / rate), now = now_ns();
			if (now < due) {
				struct timespec ts = { .tv_sec = (time_t)(due / 1000000000ull),
						       .tv_nsec = (long)(due % 1000000000ull) };
				while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
					;
			} else if (now - due > 1000000) {
				late++;
			}
		}
		int fd = fds[i % conns];
		uint64_t t0 = now_ns();
		if (full_io(fd, req, req_len, 1) < 0)
			return fail("request write");
		if (llm_read_response(fd, buf, sizeof(buf)) < 0)
			return fail("response read");
		s[i] = now_ns() - t0;
	}
	double elapsed = (double)(now_ns() - start) / 1e9;
	for (long i = 0; i < conns; i++)
		close(fds[i]);
	qsort(s, (size_t)n, sizeof(*s), cmp_u64);
	printf("{\"mode\": \"llmcalls\", \"n\": %ld, \"conns\": %ld, \"request_bytes\": %ld, \"target_per_s\": %.1f, "
	       "\"rate_per_s\": %.1f, \"late_1ms\": %llu, \"median_us\": %.3f, \"p99_us\": %.3f, \"elapsed_s\": %.6f}\n",
	       n, conns, req_len, rate, (double)n / elapsed, (unsigned long long)late, percentile_us(s, n, 50),
	       percentile_us(s, n, 99), elapsed);
	free(s);
	free(fds);
	return 0;
}

/* ---- llmload: open-loop chat calls over keep-alive connections, several in flight ---- */

#define LOAD_BUF (64 * 1024)

struct lconn {
	int fd;
	long call;          /* index of the call in flight, -1 when idle */
	uint64_t due;       /* when that call was due (latency is measured from here) */
	int first_seen;     /* the body's first `data:` (or first byte, non-streamed) arrived */
	long have, head;    /* bytes buffered; length of the response head, 0 until it is complete */
	long clen;          /* Content-Length, -1 when chunked */
	int status;
	char *buf;
};

static int lconn_head(struct lconn *c)
{
	char *end = memmem(c->buf, (size_t)c->have, "\r\n\r\n", 4);
	if (!end)
		return 0;
	c->head = end - c->buf + 4;
	char save = c->buf[c->head - 1];
	c->buf[c->head - 1] = '\0';
	c->status = atoi(c->buf + 9);
	char *cl = strcasestr(c->buf, "\r\ncontent-length:");
	c->clen = cl ? atol(cl + 17) : -1;
	c->buf[c->head - 1] = save;
	return 1;
}

/* After a read: 1 when the response is whole. */
static int lconn_whole(struct lconn *c)
{
	if (!c->head && !lconn_head(c))
		return 0;
	long body = c->have - c->head;
	if (c->clen >= 0)
		return body >= c->clen;
	return body >= 5 && !memcmp(c->buf + c->have - 5, "0\r\n\r\n", 5);
}

static uint64_t due_of(uint64_t start, long i, double rate)
{
	return rate > 0 ? start + (uint64_t)((double)i * 1e9 / rate) : 0;
}

static int llm_load(struct sockaddr_in *sa, long conns, long n, double rate, int stream, long body, long warmup)
{
	static char req[LLM_BUF];
	int one = 1;
	if (conns < 1 || conns > 1024 || n < 1 || rate < 0 || warmup < 0)
		return fprintf(stderr, "aimesh-lg: llmload needs 1 <= CONNS <= 1024, N >= 1, RATE >= 0, WARMUP >= 0\n"), 1;
	long req_len = llm_request_kind(req, sizeof(req), body, stream);
	if (req_len < 0)
		return fprintf(stderr, "aimesh-lg: llmload needs 200 <= BODY <= %d\n", LLM_BUF - 512), 1;
	long total = n + warmup;
	struct lconn *cs = calloc((size_t)conns, sizeof(*cs));
	long *idle = calloc((size_t)conns, sizeof(long));
	uint64_t *lat = calloc((size_t)n, sizeof(uint64_t)), *ttfc = calloc((size_t)n, sizeof(uint64_t));
	if (!cs || !idle || !lat || !ttfc)
		return fail("calloc");
	int ep = epoll_create1(0);
	if (ep < 0)
		return fail("epoll_create1");
	long nidle = 0;
	for (long i = 0; i < conns; i++) {
		cs[i].fd = socket(AF_INET, SOCK_STREAM, 0);
		cs[i].buf = malloc(LOAD_BUF);
		cs[i].call = -1;
		if (cs[i].fd < 0 || !cs[i].buf)
			return fail("socket");
		setsockopt(cs[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (connect(cs[i].fd, (struct sockaddr *)sa, sizeof(*sa)) < 0)
			return fail("connect");
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)i };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0)
			return fail("epoll_ctl");
		idle[nidle++] = i;
	}
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	long next = 0, done = 0, non200 = 0, late = 0;
	uint64_t start = now_ns(), measure_start = 0;
	struct epoll_event evs[64];
	while (done < total) {
		uint64_t now = now_ns();
		while (next < total && nidle > 0 && due_of(start, next, rate) <= now) {
			struct lconn *c = &cs[idle[--nidle]];
			c->call = next;
			c->due = rate > 0 ? due_of(start, next, rate) : now;
			if (now - c->due > 1000000)
				late++;
			c->first_seen = 0;
			c->have = c->head = 0;
			if (next == warmup)
				measure_start = now;
			if (full_io(c->fd, req, req_len, 1) < 0)
				return fail("request write");
			next++;
		}
		struct timespec ts = { 0, 0 }, *tp = NULL;
		if (next < total && nidle > 0) {
			uint64_t d = due_of(start, next, rate), t = now_ns();
			uint64_t wait = d > t ? d - t : 0;
			ts.tv_sec = (time_t)(wait / 1000000000ull);
			ts.tv_nsec = (long)(wait % 1000000000ull);
			tp = &ts;
		}
		int k = epoll_pwait2(ep, evs, 64, tp, NULL);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return fail("epoll_pwait2");
		for (int e = 0; e < k; e++) {
			long ci = (long)evs[e].data.u64;
			struct lconn *c = &cs[ci];
			if (c->have == LOAD_BUF) {      /* keep the head and the tail we look at */
				long keep = c->head ? c->head : 0;
				memmove(c->buf + keep, c->buf + c->have - 16, 16);
				c->have = keep + 16;
			}
			ssize_t r = read(c->fd, c->buf + c->have, LOAD_BUF - c->have);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return c->call < 0 ? fail("connection closed while idle") : fail("response read");
			if (c->call < 0)
				return fprintf(stderr, "aimesh-lg: llmload: bytes on an idle connection\n"), 1;
			c->have += r;
			uint64_t t = now_ns();
			int whole = lconn_whole(c);
			if (!c->first_seen && c->head && c->have > c->head &&
			    (!stream || memmem(c->buf + c->head, (size_t)(c->have - c->head), "data:", 5))) {
				c->first_seen = 1;
				if (c->call >= warmup)
					ttfc[c->call - warmup] = t - c->due;
			}
			if (!whole)
				continue;
			if (c->status != 200)
				non200++;
			if (c->call >= warmup)
				lat[c->call - warmup] = t - c->due;
			c->call = -1;
			idle[nidle++] = ci;
			done++;
		}
	}
	double elapsed = (double)(now_ns() - measure_start) / 1e9;
	for (long i = 0; i < conns; i++) {
		close(cs[i].fd);
		free(cs[i].buf);
	}
	close(ep);
	qsort(lat, (size_t)n, sizeof(*lat), cmp_u64);
	qsort(ttfc, (size_t)n, sizeof(*ttfc), cmp_u64);
	printf("{\"mode\": \"llmload\", \"n\": %ld, \"warmup\": %ld, \"conns\": %ld, \"stream\": %d, \"request_bytes\": %ld, "
	       "\"target_per_s\": %.1f, \"rate_per_s\": %.1f, \"late_1ms\": %ld, \"non_200\": %ld, \"median_us\": %.3f, "
	       "\"p99_us\": %.3f, \"ttfc_median_us\": %.3f, \"ttfc_p99_us\": %.3f, \"elapsed_s\": %.6f}\n",
	       n, warmup, conns, stream, req_len, rate, (double)n / elapsed, late, non200, percentile_us(lat, n, 50),
	       percentile_us(lat, n, 99), percentile_us(ttfc, n, 50), percentile_us(ttfc, n, 99), elapsed);
	free(lat);
	free(ttfc);
	free(idle);
	free(cs);
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa;
	if (argc == 5 && !strcmp(argv[1], "pipe"))
		return pipe_rr(atol(argv[2]), atol(argv[3]), atol(argv[4]));
	if (argc >= 4 && parse_addr(argv[2], argv[3], &sa) < 0)
		return 1;
	if (argc == 4 && !strcmp(argv[1], "server"))
		return serve(&sa);
	if (argc == 7 && !strcmp(argv[1], "rr"))
		return rr(&sa, atol(argv[4]), atol(argv[5]), atol(argv[6]));
	if (argc == 6 && !strcmp(argv[1], "crr"))
		return crr(&sa, atol(argv[4]), atol(argv[5]));
	if (argc == 6 && !strcmp(argv[1], "crate"))
		return crate(&sa, atol(argv[4]), atof(argv[5]));
	if (argc == 5 && !strcmp(argv[1], "bulk"))
		return bulk(&sa, strtoull(argv[4], NULL, 10));
	if (argc == 5 && !strcmp(argv[1], "llmserver"))
		return llm_serve(&sa, atoi(argv[4]));
	if (argc == 8 && !strcmp(argv[1], "llmcalls"))
		return llm_calls(&sa, atol(argv[4]), atol(argv[5]), atof(argv[6]), atol(argv[7]));
	if (argc == 10 && !strcmp(argv[1], "llmload"))
		return llm_load(&sa, atol(argv[4]), atol(argv[5]), atof(argv[6]), atoi(argv[7]), atol(argv[8]),
				atol(argv[9]));
	fprintf(stderr, "usage: %s server HOST PORT | rr HOST PORT N SIZE WARMUP | crr HOST PORT N WARMUP | "
		"crate HOST PORT N RATE | bulk HOST PORT BYTES | pipe N SIZE WARMUP | "
		"llmserver HOST PORT CHUNKS | llmcalls HOST PORT CONNS N RATE BODY | "
		"llmload HOST PORT CONNS N RATE STREAM BODY WARMUP\n", argv[0]);
	return 2;
}
