/* SPDX-License-Identifier: Apache-2.0
 * aimesh kernel/user contract: every struct, enum and limit that crosses the boundary. Types only, no code.
 *
 * Mirrors (change them together, never renumber):
 *   - agent/kernel/abi.py        ctypes structs, IntEnums, IntFlags, limits and counter slots
 *   - proto/aimesh/v1/flow.proto Verdict, Hook, Reason enums
 * tests/kernel/test_abi.py compiles a _Static_assert for every offset, size, enum member, flag, limit and counter slot
 * of abi.py against this header, and checks that every enum member and #define here has a mirror there and back.
 *
 * Addresses are always 16 bytes in network order; IPv4 is stored v4-mapped (::ffff:a.b.c.d) so one key layout
 * serves both families and v4-mapped IPv6 sockets need no special case. Ports in keys are host order.
 */
#ifndef AIMESH_ABI_H
#define AIMESH_ABI_H

/* Limits (mirror: abi.py Limits, whose defaults equal these); the loader passes overrides with -D
 * (agent/kernel/abi.py: Limits.cflags). */
#ifndef MAX_CGROUPS
#define MAX_CGROUPS 65536
#endif
#ifndef MAX_PROCESSES
#define MAX_PROCESSES 65536
#endif
#ifndef MAX_ENDPOINTS
#define MAX_ENDPOINTS 65536        /* both generations together */
#endif
#ifndef MAX_LOCAL_ENDPOINTS
#define MAX_LOCAL_ENDPOINTS 16384
#endif
#ifndef MAX_IDENTITIES
#define MAX_IDENTITIES 16384       /* both generations together */
#endif
#ifndef MAX_POLICIES
#define MAX_POLICIES 262144        /* both generations together */
#endif
#ifndef MAX_REDIRECTS
#define MAX_REDIRECTS 4096
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 16384
#endif
#ifndef MAX_REVERSE_NAT
#define MAX_REVERSE_NAT 65536
#endif
#ifndef MAX_UDP_FLOWS
#define MAX_UDP_FLOWS 65536
#endif
#ifndef MAX_LOCAL_PEERS
#define MAX_LOCAL_PEERS 65536
#endif
#ifndef MAX_FASTPATH_SOCKETS
#define MAX_FASTPATH_SOCKETS 65536
#endif
#ifndef MAX_DECISION_KEYS
#define MAX_DECISION_KEYS 65536    /* (source, destination, hook, verdict, deprecated) pairs counted per CPU */
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256           /* 1 MiB: ~8.7k decisions between two 25 ms drains (350k/s) */
#endif
#ifndef FLOW_RINGBUF_PAGES
#define FLOW_RINGBUF_PAGES 1024        /* 4 MiB: ~26k flow records between two 25 ms drains (1M/s) */
#endif
#ifndef MAX_CAPTURE_SOCKETS
#define MAX_CAPTURE_SOCKETS 16384  /* (tgid, fd) of client sockets toward identities with LLM capture on */
#endif
#ifndef CAPTURE_RINGBUF_PAGES
#define CAPTURE_RINGBUF_PAGES 1024  /* 4 MiB of captured chunks between two 25 ms drains */
#endif
#ifndef CAPTURE_CHUNK
#define CAPTURE_CHUNK 4096          /* data bytes per capture_events record */
#endif
#define CAPTURE_CHUNKS_PER_CALL 256 /* mirror: abi.py CAPTURE_CHUNKS_PER_CALL. turns of the copy loop per send/receive:
                                     * each copies one chunk or steps to the next iovec (1 MiB at the default
                                     * CAPTURE_CHUNK, the default request budget); the rest of that call is a gap */
#define CAPTURE_IOVECS 8            /* mirror: abi.py CAPTURE_IOVECS. writev/readv/sendmsg/recvmsg: iovecs looked at */
#define BACKENDS_PER_SERVICE 16    /* mirror: abi.py BACKENDS_PER_SERVICE. weighted split: at most this many backends per redirect */
#define MAX_GATEWAY_ORIGINS 65536  /* mirror: abi.py MAX_GATEWAY_ORIGINS. gateway_pending and gateway_origin entries (LRU) */
#define MAX_UDP_REPLIES 65536      /* mirror: abi.py MAX_UDP_REPLIES. udp_reply entries (LRU) */

/* Reserved identities (mirror: abi.py ID_*). User identities start at ID_FIRST_USER. */
#define ID_NONE       0
#define ID_UNMANAGED  1   /* a local workload no selector matched */
#define ID_WORLD      2   /* a remote address no endpoint matched */
#define ID_FIRST_USER 16

/* Decision verdicts. Mirrors: abi.py Verdict and VERDICT_MAX; flow.proto Verdict (0 is VERDICT_UNSPECIFIED there);
 * labels derived from the names: agent/export/metrics.py (aimesh_kernel_decisions, aimesh_connections),
 * agent/export/flow_metrics.py (aimesh_flows), agent/flows/decode.py (flow log). */
enum aimesh_verdict {
	VERDICT_NONE       = 0,
	VERDICT_ALLOWED    = 1,
	VERDICT_DENIED     = 2,
	VERDICT_AUDIT      = 3,   /* allowed, but enforce mode would deny */
	VERDICT_REDIRECTED = 4,   /* allowed and rewritten to a backend */
	VERDICT__MAX       = 8,
};

/* Where the decision was taken. Mirrors: abi.py Hook and HOOK_MAX; flow.proto Hook (0 is HOOK_UNSPECIFIED there);
 * labels derived from the names: agent/export/metrics.py (aimesh_kernel_decisions), agent/flows/decode.py.
 * A new hook also needs its own block of decision counters (see COUNTER_DECISION_HOOKS). */
enum aimesh_hook {
	HOOK_NONE    = 0,
	HOOK_CONNECT = 1,   /* cgroup connect4/6 */
	HOOK_SENDMSG = 2,   /* cgroup sendmsg4/6 (unconnected UDP) */
	HOOK_INGRESS = 3,   /* cgroup_skb ingress, remote source */
	HOOK_EGRESS  = 4,   /* cgroup_skb egress: a raw socket's packet (never passed connect/sendmsg). No decision counter
	                     * block: COUNTER_RAW_DENIED / COUNTER_RAW_PASSED count it */
	HOOK__MAX    = 5,
};

/* Why. Mirrors: abi.py Reason; flow.proto Reason (0 is REASON_UNSPECIFIED there);
 * labels derived from the names: agent/flows/decode.py (flow log). */
enum aimesh_reason {
	REASON_NONE           = 0,
	REASON_POLICY         = 1,  /* a policy allowed it; rule_id says which */
	REASON_NOT_GOVERNED   = 2,  /* neither end is governed */
	REASON_SAME_IDENTITY  = 3,
	REASON_DNS            = 4,
	REASON_NO_POLICY_SRC  = 5,  /* the governed source has no policy to the destination */
	REASON_NO_POLICY_DST  = 6,  /* the governed destination has no policy from the source */
	REASON_SUNSET         = 7,  /* destination deprecated past its sunset, no successor to redirect to */
	REASON_FAMILY         = 8,  /* redirect skipped: backend family cannot be reached from this socket */
	REASON_REPLY          = 9,  /* UDP sent from a port the sender's identity serves: a reply, not a new flow */
	REASON_RAW_SOCKET     = 10, /* a raw socket's packet to a destination its identity may not reach (HOOK_EGRESS) */
};

/* decision_event.flags (mirror: abi.py EventFlag; flow.proto FlowRecord deprecated/lifecycle/redirected) */
#define EV_F_DEPRECATED        0x01   /* destination is deprecated (before or after sunset) */
#define EV_F_LIFECYCLE         0x02   /* redirected to the successor because of the sunset */
#define EV_F_REDIRECTED        0x04   /* the connection was rewritten (also set with VERDICT_AUDIT) */
#define EV_F_GATEWAY           0x08   /* rewritten to the node's L7 gateway (with EV_F_REDIRECTED) */

/* identity_info.flags (mirror: abi.py IdentityFlag) */
#define ID_F_GOVERNED   0x01
#define ID_F_ENFORCE    0x02   /* effective mode of this identity is enforce (else audit) */
#define ID_F_DEPRECATED 0x04
#define ID_F_SUNSET     0x08   /* past its sunset date (the agent flips this at the sunset instant) */
#define ID_F_LLM_CAPTURE 0x10  /* connections to it are captured (llm.protocol not off): bpf/capture.c */
#define ID_F_GATEWAY     0x20  /* the reserved `gateway` identity (the L7 gateway's cgroup): its connects are never
                                * handed to the gateway again */
#define ID_F_GW_ORIGINATE 0x40 /* llm.tls: originate: only ID_F_GATEWAY sources may connect to it without the gateway;
                                * a direct connect from anyone else is denied with REASON_NO_POLICY_DST */

/* policy_value.flags (mirror: abi.py PolicyFlag) */
#define POLICY_F_GATEWAY 0x01  /* the pair needs L7 policy: the connect is rewritten to the gateway (runtime_config.gw_*);
                                * a socket that cannot reach the gateway is denied with REASON_FAMILY */
#define POLICY_F_TLS     0x02  /* the client speaks TLS to the destination (llm.tls: intercept): gateway_origin.flags */
#define POLICY_F_FAST_PATH 0x04 /* the pair opted in to the same-node fast path (policy `fast_path: true`; TCP only) */

/* gateway_origin.flags (mirror: abi.py GatewayOriginFlag) */
#define GW_ORIGIN_F_TLS  0x01  /* TLS expected from the client */

/* runtime_config.flags (mirror: abi.py ConfigFlag) */
#define CFG_F_DNS_ALLOW  0x01
#define CFG_F_WATCH_EXEC 0x02   /* emit exec events (only when process selectors exist) */
#define CFG_F_FAST_PATH  0x04   /* same-node fast path: sockhash + sk_msg */
#define CFG_F_UNMANAGED_CLOSED 0x08   /* a workload-identity map is full: unmanaged counts as governed and enforced */
#define CFG_F_ALL_DECISIONS 0x10      /* emit a decision event for plain allows too (a flow log wants every one) */
#define CFG_F_LLM_CAPTURE 0x20        /* some identity has ID_F_LLM_CAPTURE: connects are followed (bpf/capture.c) */

/* verdict_counters slots (mirror: abi.py COUNTER_* and counter_decision; metric labels: agent/export/metrics.py,
 * agent/daemon.py flow losses). Every slot is a fixed number: adding a hook, a verdict or a counter moves no slot.
 * New counters take the next free number below COUNTER_SLOTS; a slot is never reused for another meaning.
 * Decisions: COUNTER_DECISION_BASE + hook * COUNTER_DECISION_VERDICTS + verdict for hook < COUNTER_DECISION_HOOKS,
 * i.e. slots 0..31. The stride is a literal, not VERDICT__MAX; a fifth hook needs a block of its own past the drop
 * counters (the asserts below stop the build until it has one). */
#define COUNTER_DECISION_BASE          0
#define COUNTER_DECISION_HOOKS         4
#define COUNTER_DECISION_VERDICTS      8
#define COUNTER_DECISION(hook, verdict) (COUNTER_DECISION_BASE + (hook) * COUNTER_DECISION_VERDICTS + (verdict))
#define COUNTER_DECISION_EVENTS_LOST   32
#define COUNTER_AGENT_EVENTS_LOST      33
#define COUNTER_LOCAL_ENDPOINTS_FULL   34
#define COUNTER_REVERSE_NAT_FULL       35
#define COUNTER_FLOW_EVENTS_LOST       36
#define COUNTER_UDP_FLOWS_FULL         37
#define COUNTER_FLOWS_UNTRACKED        38   /* established with no connect-time origin */
#define COUNTER_FASTPATH_SOCKETS       39   /* sockets put in fastpath_sockets */
#define COUNTER_FASTPATH_FULL          40   /* fallback: fastpath_sockets full */
#define COUNTER_FASTPATH_REMOTE        41   /* fallback: the peer is not on this host */
#define COUNTER_FASTPATH_UNWATCHED     42   /* fallback: the local peer is not governed */
#define COUNTER_FASTPATH_MESSAGES      43   /* sendmsg calls handed straight to the peer */
#define COUNTER_FASTPATH_BYTES         44
#define COUNTER_DECISION_KEYS_FULL     45   /* decision_counts full: the decision is in its hook/verdict slot only */
#define COUNTER_CAPTURE_SOCKETS_FULL   46   /* capture_sockets full: a connection to a captured identity is not captured */
#define COUNTER_CAPTURE_EVENTS_LOST    47   /* capture_events full: a chunk (or a close) was lost */
#define COUNTER_CAPTURE_TRUNCATED      48   /* sends/receives not copied whole: past the per-request byte budget, past
                                             * CAPTURE_CHUNKS_PER_CALL chunks, or past CAPTURE_IOVECS iovecs (a GAP record) */
#define COUNTER_CAPTURE_NOT_CAPTURED   49   /* sends/receives on a captured socket the agent or the TLS check said to skip */
#define COUNTER_CAPTURE_CHUNKS         50   /* chunks put in capture_events */
#define COUNTER_CAPTURE_READ_FAILED    51   /* bpf_probe_read_user failed: the rest of that call is a gap */
#define COUNTER_CAPTURE_TLS_SOCKETS    52   /* captured sockets whose first send was a TLS handshake record */
#define COUNTER_CAPTURE_TRUNCATED_BYTES 53  /* bytes of the sends/receives counted in COUNTER_CAPTURE_TRUNCATED not copied */
#define COUNTER_CAPTURE_LOST_BYTES     54   /* bytes of sends/receives whose chunks and GAP record the full ring dropped: the
                                             * socket's next record tells the agent (capture_event.lost_*) */
#define COUNTER_PROCESS_IDENTITY_FULL  55   /* process_identity full at fork: the child kept no identity (fails closed) */
#define COUNTER_PORT_COBIND_REFUSED    56   /* a bind to an addr:port that live sockets of another identity hold: EPERM */
#define COUNTER_PORT_BIND_RACE         57   /* a bind that lost a race with the holder's release, or whose socket record
                                             * could not be made: EPERM (fails closed; the binder may retry) */
#define COUNTER_INGRESS_UNLISTED_EXACT 58   /* from this host (loopback) at an address not in local_address yet, to an
                                             * exact address:port bind: let in (its sender was judged against that bind) */
#define COUNTER_INGRESS_UNLISTED_JUDGED 59  /* the same to a wildcard bind: judged as from world (fails closed) */
#define COUNTER_RAW_DENIED             60   /* packets of raw sockets (SOCK_RAW) dropped by the egress program */
#define COUNTER_RAW_PASSED             61   /* packets of raw sockets the egress program judged and let through (allowed
                                             * or audit) */
#define COUNTER_SLOTS                  64   /* 62, 63 free */
_Static_assert(HOOK_EGRESS + 1 == HOOK__MAX && HOOK_INGRESS < COUNTER_DECISION_HOOKS,
	       "a new hook needs its own block of decision counter slots (HOOK_EGRESS has none: COUNTER_RAW_*)");
_Static_assert(VERDICT__MAX <= COUNTER_DECISION_VERDICTS, "a new verdict does not fit the decision counter stride");
_Static_assert(COUNTER_DECISION_BASE + COUNTER_DECISION_HOOKS * COUNTER_DECISION_VERDICTS <= COUNTER_DECISION_EVENTS_LOST,
	       "decision counters overlap the drop counters");

struct runtime_config {
	__u32 active_gen;   /* 0 or 1: which generation of the policy maps is live */
	__u32 flags;        /* CFG_F_* */
	__u64 interim_ns;   /* a still-open TCP connection reports at most this often (0: only at close) */
	__u32 capture_request_bytes;    /* capture: bytes copied per request (sends until the next receive) */
	__u32 capture_response_bytes;   /* capture: bytes copied per response (receives until the next send) */
	__u8  gw_addr[16];  /* where connects that need the L7 gateway go (gateway.redirect_address), 16-byte form */
	__u16 gw_port;      /* host order; 0: no gateway, such connects are denied (REASON_FAMILY) */
	__u16 gw_pad;
	__u32 pad;
};

/* endpoint_identity (LPM trie): prefixlen counts gen(8)+pad(8)+port(16) = 32 bits, then address bits. port 0 = any. */
struct endpoint_key {
	__u32 prefixlen;
	__u8  gen;
	__u8  pad;
	__u16 port;
	__u8  addr[16];
};

/* local_endpoint_identity: what a local workload bound (post_bind). addr all-zero = wildcard bind. */
struct local_endpoint_key {
	__u8  addr[16];
	__u16 port;
	__u8  proto;
	__u8  pad;
};

/* local_endpoint_refs: who holds a bound (addr, port, proto): the live sockets of one identity that registered it at
 * post_bind (refs), released at sock_release. The first identity keeps the entry for as long as any of its sockets
 * holds the port; a co-binder (SO_REUSEPORT/SO_REUSEADDR) of another identity is refused. LREF_F_DEAD: the last
 * holder is deleting the entry (a binder retries); LREF_F_SEEDED: written by the agent for a socket bound before the
 * datapath (no release will come; the agent removes it when no socket holds the port). */
#define LREF_F_DEAD   1
#define LREF_F_SEEDED 2
struct local_endpoint_ref {
	struct bpf_spin_lock lock;
	__u32 identity;
	__u32 flags;        /* LREF_F_* */
	__u32 pad;
	__u64 refs;
};

/* bound_port (socket storage): the key a socket registered in local_endpoint_refs, for its release. */
struct bound_port {
	struct local_endpoint_key key;
	__u32 identity;
};

struct identity_key {
	__u32 id;
	__u32 gen;
};

struct identity_info {
	__u32 flags;    /* ID_F_* */
	__u32 pad;
};

/* policy_verdict: (src, dst, port, proto) -> allow. port 0 = any port; proto is 6 or 17. */
struct policy_key {
	__u32 src;
	__u32 dst;
	__u16 port;
	__u8  proto;
	__u8  gen;
};

struct policy_value {
	__u32 rule_id;  /* index of the policy in the config, for the record (RULE_ID_GATEWAY: the gateway's own) */
	__u32 flags;    /* POLICY_F_* */
};

#define RULE_ID_GATEWAY 0xffffffff   /* mirror: abi.py RULE_ID_GATEWAY. the compiled allow of the gateway identity */

/* redirect_service: (src, dst) -> backends; src ID_NONE = any source. */
struct redirect_key {
	__u32 src;
	__u32 dst;
	__u32 gen;
};

struct redirect_value {
	__u32 first_backend;   /* key index into redirect_backend */
	__u32 target_id;       /* identity the backends belong to (the successor for a lifecycle redirect) */
	__u32 total_weight;
	__u16 count;           /* <= BACKENDS_PER_SERVICE */
	__u16 flags;           /* EV_F_LIFECYCLE for sunset redirects */
};

struct backend_key {
	__u32 index;
	__u32 gen;
};

struct backend {
	__u8  addr[16];
	__u32 cum_weight;      /* cumulative weight: pick the first with rand % total < cum_weight */
	__u16 port;            /* host order */
	__u8  is_v4;
	__u8  pad;
};

/* dialed_address (sk storage) and udp_reverse_nat values: what the client dialed. */
struct dialed {
	__u8  addr[16];
	__u8  backend[16];
	__u16 port;            /* host order */
	__u16 backend_port;    /* host order */
	__u32 pad;
};

/* (socket, remote address): udp_reverse_nat, udp_flows, udp_reply. */
struct socket_peer_key {
	__u64 cookie;
	__u8  addr[16];        /* backend address */
	__u16 port;            /* backend port, host order */
	__u16 pad1;
	__u32 pad2;
};

/* decision_counts key: every connect, first sendmsg per destination and ingress decision is counted here, per CPU,
 * and read at scrape time (aimesh_connections_total): exact even when the decision ring is full, and a plain allow
 * needs no ring event at all. */
struct decision_count_key {
	__u32 src;
	__u32 dst;
	__u8  hook;
	__u8  verdict;
	__u8  deprecated;
	__u8  pad;
};

/* One decision, emitted to decision_events. */
struct decision_event {
	__u64 ts_ns;           /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 cgroup_id;
	__u64 cookie;          /* socket cookie; joins with later flow records */
	__u8  dialed_addr[16];
	__u8  actual_addr[16];
	__u8  peer_addr[16];   /* ingress: the remote source; sendmsg: msg source if set */
	__u32 pid;
	__u32 src_id;
	__u32 dst_id;          /* identity dialed (policy is judged on it) */
	__u32 actual_dst_id;   /* identity really reached (differs on lifecycle redirects) */
	__u32 rule_id;
	__u16 dialed_port;     /* host order */
	__u16 actual_port;
	__u16 peer_port;
	__u8  is_v6;           /* socket family */
	__u8  proto;
	__u8  hook;
	__u8  verdict;
	__u8  reason;
	__u8  flags;
	char  comm[16];
};

/* Flow event kinds (mirror: abi.py FlowKind). Not the numbers of flow.proto RecordKind: agent/flows/records.py maps
 * FLOW_KIND_CONNECTION to RECORD_KIND_CONNECTION (1) with interim=false and FLOW_KIND_INTERIM to RECORD_KIND_CONNECTION
 * with interim=true. FLOW_KIND_UDP is reserved and never emitted: the agent builds UDP records from udp_flows itself, as
 * RECORD_KIND_UDP_AGGREGATE (2). RECORD_KIND_DECISION (3) comes from decision_events, not from here. */
enum flow_kind {
	FLOW_KIND_CONNECTION = 1,   /* a TCP connection side, at close */
	FLOW_KIND_INTERIM    = 2,   /* a TCP connection side still open: totals so far */
	FLOW_KIND_UDP        = 3,   /* UDP between two identities over a window (built by the agent) */
};

/* Which end of the connection the socket is (mirror: abi.py Side, whose UNKNOWN = 0 is flow_origin.side before
 * established). A flow_event counts bytes and segments from its own socket's point of view; the agent turns
 * server-side events around so that every record is client-relative (agent/flows/records.py flow_record). */
enum flow_side {
	SIDE_CLIENT = 1,
	SIDE_SERVER = 2,
};

/* flow_state (sk storage): what the connect decision or the passive open knew about a TCP socket. */
struct flow_origin {
	__u64 start_ns;
	__u64 last_report_ns;
	__u64 cookie;
	__u64 cgroup_id;
	__u8  dialed_addr[16];
	__u32 pid;
	__u32 src_id;
	__u32 dst_id;
	__u32 actual_dst_id;
	__u16 dialed_port;
	__u8  verdict;
	__u8  reason;
	__u8  flags;
	__u8  side;         /* enum flow_side; 0 until established */
	__u8  pad[2];
	char  comm[16];
};

/* One TCP connection side, emitted to flow_events at close (and as interim records while open). */
struct flow_event {
	__u64 cookie;
	__u64 start_ns;
	__u64 end_ns;
	__u64 bytes_sent;       /* payload bytes this socket sent and the peer acknowledged (this side's view) */
	__u64 bytes_received;   /* payload bytes this socket received */
	__u64 cgroup_id;
	__u8  local_addr[16];
	__u8  remote_addr[16];
	__u8  dialed_addr[16];
	__u32 pid;
	__u32 src_id;
	__u32 dst_id;
	__u32 actual_dst_id;
	__u32 srtt_us;
	__u32 retransmits;
	__u32 segs_out;
	__u32 segs_in;
	__u16 local_port;
	__u16 remote_port;
	__u16 dialed_port;
	__u8  is_v6;
	__u8  proto;
	__u8  side;
	__u8  kind;             /* enum flow_kind */
	__u8  verdict;
	__u8  reason;
	__u8  flags;
	__u8  pad[3];
	char  comm[16];
};

/* udp_flows value: one UDP socket's traffic to one remote address, counted by the cgroup_skb programs. */
struct udp_flow {
	__u64 first_ns;
	__u64 last_ns;
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 packets_sent;
	__u64 packets_received;
	__u64 cgroup_id;
	__u8  dialed_addr[16];
	__u32 pid;
	__u32 src_id;
	__u32 dst_id;
	__u32 actual_dst_id;
	__u16 dialed_port;
	__u8  verdict;
	__u8  reason;
	__u8  flags;
	__u8  is_v6;
	__u8  pad[2];
	char  comm[16];
};

/* fastpath_sockets key, and fastpath_state key: one TCP socket by its own 4-tuple (local first). */
struct sock_tuple {
	__u8  local[16];
	__u8  remote[16];
	__u16 local_port;      /* host order */
	__u16 remote_port;     /* host order */
	__u32 pad;
};

/* fastpath_state value: whether this socket's sends go straight to its peer, and what went that way. */
struct fastpath_state {
	__u64 bytes_sent;      /* redirected by sk_msg from this socket */
	__u64 bytes_received;  /* redirected by sk_msg to this socket */
	__u32 mode;            /* 0: undecided until the first send; 1: redirect; 2: normal path */
	__u32 pad;
};

/* local_peer value: the identity behind a local client socket, for the server side of the same connection. */
struct peer_origin {
	__u32 src_id;
	__u32 pid;
};

/* agent_event.kind (mirror: abi.py AgentEventKind). */
enum agent_event_kind {
	AGENT_EV_CGROUP_MKDIR = 1,
	AGENT_EV_EXEC         = 2,
};

#define AGENT_EV_PATH_LEN 256   /* mirror: abi.py AGENT_EV_PATH_LEN */

/* One control event, emitted to agent_events: a new cgroup or an exec to classify. */
struct agent_event {
	__u64 cgroup_id;
	__u32 kind;
	__u32 pid;
	char  path[AGENT_EV_PATH_LEN];   /* cgroup path relative to the cgroup2 root (mkdir) */
};

/* Plaintext capture (bpf/capture.c, bpf/tls.c). Mirrors: abi.py CaptureKind, CaptureDirection. */
enum capture_kind {
	CAPTURE_KIND_DATA  = 1,   /* bytes a send or a receive moved */
	CAPTURE_KIND_CLOSE = 2,   /* the socket's fd was closed: no data */
	CAPTURE_KIND_GAP   = 3,   /* no data: bytes offset..total of that send/receive were not copied (budget, chunk or
	                           * iovec limit, failed read); follows the call's DATA records, in stream order */
	CAPTURE_KIND_TLS_HANDSHAKE = 4,   /* no data: the first send was a TLS handshake record outside any probed SSL_*
	                                   * call; the socket is flagged TLS and its syscalls are not copied */
	CAPTURE_KIND_OPEN  = 5,   /* the connect of a captured socket went through (or is in progress): the data is one
	                           * struct capture_open, the address as dialed; no direction */
};

/* CAPTURE_KIND_OPEN data: where the client connected to, as it dialed it (before any redirect). */
struct capture_open {
	__u8  addr[16];      /* IPv6, or IPv4-mapped */
	__u16 port;          /* host order */
	__u8  pad[6];
};

enum capture_direction {
	CAPTURE_DIR_SEND = 1,     /* write, sendto, writev, sendmsg: the client's request bytes */
	CAPTURE_DIR_RECV = 2,     /* read, recvfrom, readv, recvmsg: the server's response bytes */
};

/* capture_sock.flags (mirror: abi.py CaptureSockFlag) */
#define CAPTURE_SOCK_F_TLS  0x01   /* the socket carries TLS: its syscalls' (cipher) bytes are never copied. Set when an
                                    * SSL_* call used it (lib/tls.h; bpf/tls.c copies its plaintext) or when its first
                                    * send was a TLS handshake record (a TLS_HANDSHAKE record tells the agent) */
#define CAPTURE_SOCK_F_SENT 0x02   /* the first send was looked at (the handshake check is done) */
#define CAPTURE_SOCK_F_SKIP 0x04   /* the agent's decoder gave up (not HTTP/1): copy nothing more; close still reported */

/* capture_sockets key: a socket as the syscalls name it. */
struct capture_sock_key {
	__u32 tgid;
	__u32 fd;
};

/* capture_sockets value, and capture_connect value while a connect is in progress. */
struct capture_sock {
	__u64 cookie;
	__u64 burst_bytes;   /* bytes moved in the current direction since it last flipped (the per-request budget) */
	__u32 src_id;
	__u32 dst_id;
	__u32 actual_dst_id;
	__u32 fd;            /* capture_connect: the fd sys_enter_connect saw */
	__u32 ready;         /* capture_connect: the connect hook asked for capture */
	__u32 flags;         /* CAPTURE_SOCK_F_* */
	__u32 lost_send;     /* bytes sent that the full ring dropped (chunks and their GAP record) since the last
	                      * record of this socket that made it: the next one carries them (capture_event.lost_send) */
	__u32 lost_recv;     /* the same for bytes received */
	__u8  dialed_addr[16];   /* capture_connect: the address the connect asked for (lib/capture.h), for the OPEN record */
	__u16 dialed_port;   /* host order */
	__u8  direction;     /* enum capture_direction of the current burst; 0 before the first */
	__u8  pad[5];
};

/* capture_event.flags (mirror: abi.py CaptureEventFlag) */
#define CAPTURE_EV_F_TLS   0x1   /* the data is the plaintext of an OpenSSL SSL_* call (bpf/tls.c), not a syscall's */

/* tls_calls value: an SSL_* call in progress on a thread of a governed process (uprobe -> uretprobe). */
struct tls_call {
	__u64 ssl;           /* the SSL * */
	__u64 buf;           /* the caller's plaintext buffer */
	__u64 len_ptr;       /* SSL_write_ex / SSL_read_ex: the size_t * of bytes moved; 0 for SSL_write / SSL_read */
	__u32 fd;            /* the socket the call's send/receive syscall used (or tls_ssl_fd knew) */
	__u8  direction;     /* enum capture_direction; 0 for a handshake (no data) */
	__u8  has_fd;        /* fd is known */
	__u8  depth;         /* hooked SSL_* calls nested inside this one (SSL_read may run a handshake): not tracked */
	__u8  pad;
};

/* tls_ssl_fd key: an SSL object of one process (its pointer). */
struct tls_ssl_key {
	__u64 ssl;
	__u32 tgid;
	__u32 pad;
};

/* capture_cursor value: how far the copy of the send/receive in progress on this CPU got (bpf/capture.c). */
struct capture_cursor {
	__u64 seg;           /* the buffer (or iovec) being copied */
	__u64 seg_len;       /* bytes of it to copy */
	__u64 seg_off;       /* of them copied */
	__u64 done;          /* bytes of the call copied */
	__u32 iov;           /* iovecs taken */
	__u32 pad;
};

/* One capture_events record: this header, then a data area of 256, 1024 or CAPTURE_CHUNK bytes (the smallest that
 * holds the chunk: bpf/capture.c CAPTURE_CLASS_*) of which the first len are valid; the agent reads len and ignores
 * the record's size. A syscall that moved more than one chunk gives several records (offset). CLOSE and GAP records
 * are the header alone. */
struct capture_event {
	__u64 ts_ns;
	__u64 cookie;
	__u32 tgid;
	__u32 fd;
	__u32 src_id;
	__u32 dst_id;
	__u32 actual_dst_id;
	__u32 total;         /* bytes the syscall moved */
	__u32 offset;        /* of this chunk within them (GAP: the first byte not copied) */
	__u32 len;           /* valid data bytes after the header */
	__u32 lost_send;     /* bytes sent on this socket before this record that the full ring dropped, no record
	                      * telling of them: a hole in the request direction, before this record */
	__u32 lost_recv;     /* the same, received: a hole in the response direction */
	__u8  kind;          /* enum capture_kind */
	__u8  direction;     /* enum capture_direction */
	__u8  flags;         /* CAPTURE_EV_F_* */
	__u8  pad[5];
};

/* L7 gateway hand-off (bpf/sock_addr.c writes gateway_pending at connect, keyed by socket cookie; bpf/sock_ops.c
 * moves it to gateway_origin at ACTIVE_ESTABLISHED, keyed by the client's local address and port: what the gateway
 * sees as the peer of the accepted connection. agent/gateway/origin.py reads and deletes it.) */
struct gateway_client_key {
	__u8  addr[16];      /* the client socket's local address (v4-mapped for IPv4), network order */
	__u16 port;          /* its local port, host order */
	__u16 pad;
};

struct gateway_origin {
	__u8  addr[16];      /* the destination as dialed */
	__u16 port;          /* host order */
	__u8  family;        /* AF_INET (2) when the dialed address is IPv4 (or v4-mapped), else AF_INET6 (10) */
	__u8  flags;         /* GW_ORIGIN_F_* */
	__u32 src_id;
	__u32 dst_id;
	__u32 policy_gen;    /* runtime_config.active_gen at connect */
	__u64 cookie;        /* the client socket's cookie */
	__u64 ts_ns;         /* bpf_ktime_get_ns at connect */
};

#endif /* AIMESH_ABI_H */
