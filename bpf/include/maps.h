/* SPDX-License-Identifier: Apache-2.0
 * Every aimesh map, one "what -> what" line each. Included once, by bpf/programs.h.
 * Generation-keyed maps (gen in the key) are double-buffered: the agent writes the inactive generation, flips
 * runtime_config.active_gen, then deletes the old one, so a reload is atomic for every program run.
 * decision_events, flow_events and capture_events are submitted with BPF_RB_NO_WAKEUP: waking the agent per event made every connect
 * pay for a wakeup; the agent drains them on a short timer instead. agent_events (rare) wake it at once.
 */
#ifndef AIMESH_MAPS_H
#define AIMESH_MAPS_H
#include "abi.h"

/* Every map is pinned in bpffs so the datapath outlives the agent: PIN_<map> is its path, which the loader passes
 * with -D (agent/kernel/registry.py: pin_cflags; the name carries a digest of the map's layout). bcc reuses a map
 * already pinned at that path and creates and pins it otherwise. The macros below are bcc's BPF_RINGBUF_OUTPUT,
 * BPF_SK_STORAGE and BPF_SOCKHASH with the pinned section name ("maps/<type>:<path>") that BPF_TABLE_PINNED uses. */
#define AIMESH_RINGBUF(_name, _pages) \
struct _name##_table_t { int key; u32 leaf; int (*ringbuf_output)(void *, u64, u64); void *(*ringbuf_reserve)(u64); \
	void (*ringbuf_discard)(void *, u64); void (*ringbuf_submit)(void *, u64); u32 max_entries; }; \
__attribute__((section("maps/ringbuf:" PIN_##_name))) struct _name##_table_t _name = { .max_entries = ((_pages) * PAGE_SIZE) }
#define AIMESH_SK_STORAGE(_name, _leaf_type) \
struct _name##_table_t { int key; _leaf_type leaf; void *(*sk_storage_get)(void *, void *, int); \
	int (*sk_storage_delete)(void *); u32 flags; }; \
__attribute__((section("maps/sk_storage:" PIN_##_name))) struct _name##_table_t _name = { .flags = BPF_F_NO_PREALLOC }; \
BPF_ANNOTATE_KV_PAIR(_name, int, _leaf_type)
#define AIMESH_SOCKHASH(_name, _key_type, _max_entries) \
struct _name##_table_t { _key_type key; int leaf; int (*update)(_key_type *, int *); int (*delete)(_key_type *); \
	int (*sock_hash_update)(void *, void *, u64); int (*msg_redirect_hash)(void *, void *, u64); \
	int (*sk_redirect_hash)(void *, void *, u64); u32 max_entries; }; \
__attribute__((section("maps/sockhash:" PIN_##_name))) struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)
#define AIMESH_MAP(_type, _key, _value, _name, _max) BPF_TABLE_PINNED(_type, _key, _value, _name, _max, PIN_##_name)
#define AIMESH_MAP_F(_type, _key, _value, _name, _max, _flags) \
	BPF_TABLE_PINNED(_type, _key, _value, _name, _max, PIN_##_name, _flags)

AIMESH_MAP("array", __u32, struct runtime_config, runtime_config, 1);                        /* 0 -> live generation, flags */
AIMESH_MAP("hash", __u64, __u32, cgroup_identity, MAX_CGROUPS);                                /* cgroup id -> identity */
AIMESH_MAP("hash", __u64, __u32, cgroup_inherit, MAX_CGROUPS);                                 /* cgroup id -> identity every descendant has */
AIMESH_MAP("hash", __u32, __u32, process_identity, MAX_PROCESSES);                             /* tgid -> identity */
AIMESH_MAP_F("lpm_trie", struct endpoint_key, __u32, endpoint_identity, MAX_ENDPOINTS, BPF_F_NO_PREALLOC); /* (gen, port, prefix) -> identity */
AIMESH_MAP("hash", struct local_endpoint_key, __u32, local_endpoint_identity, MAX_LOCAL_ENDPOINTS); /* bound (addr, port, proto) -> identity */
AIMESH_MAP("hash", struct local_endpoint_key, struct local_endpoint_ref, local_endpoint_refs, MAX_LOCAL_ENDPOINTS); /* bound (addr, port, proto) -> holding identity, live sockets */
AIMESH_SK_STORAGE(bound_port, struct bound_port);                                              /* socket -> the key it holds in local_endpoint_refs */
AIMESH_MAP("hash", struct local_endpoint_key, __u8, local_address, 1024);                      /* this host's addresses (port 0) -> 1 */
AIMESH_MAP("hash", struct local_endpoint_key, __u8, dns_resolver, 64);                          /* a resolver's address (port 0) -> 1 */
AIMESH_MAP("hash", struct identity_key, struct identity_info, identity_info, MAX_IDENTITIES);  /* (id, gen) -> governed/mode/lifecycle */
AIMESH_MAP("hash", struct policy_key, struct policy_value, policy_verdict, MAX_POLICIES);      /* (src, dst, port, proto, gen) -> allow */
AIMESH_MAP("hash", struct redirect_key, struct redirect_value, redirect_service, MAX_REDIRECTS); /* (src, dst, gen) -> backend set */
AIMESH_MAP("hash", struct backend_key, struct backend, redirect_backend, MAX_BACKENDS);        /* (index, gen) -> backend address */
AIMESH_SK_STORAGE(dialed_address, struct dialed);                                              /* socket -> address it dialed */
AIMESH_MAP("lru_hash", struct socket_peer_key, struct dialed, udp_reverse_nat, MAX_REVERSE_NAT); /* (cookie, backend) -> dialed */
AIMESH_MAP("hash", struct socket_peer_key, struct udp_flow, udp_flows, MAX_UDP_FLOWS);        /* (cookie, remote) -> UDP counters; not LRU: full is counted, never a silent eviction; the agent removes idle entries */
AIMESH_MAP("lru_hash", struct socket_peer_key, __u32, udp_reply, MAX_UDP_REPLIES);          /* (server socket, client addr:port) -> client identity (ID_NONE: local, judged at its sendmsg): that client wrote to this socket first and was let in, so the socket's datagrams back to it are replies */
AIMESH_SK_STORAGE(socket_cgroup, __u64);                                                      /* socket -> cgroup id it was created in (sock_create) */
AIMESH_SK_STORAGE(flow_state, struct flow_origin);                                             /* TCP socket -> identities, start */
AIMESH_MAP("lru_hash", struct local_endpoint_key, struct peer_origin, local_peer, MAX_LOCAL_PEERS); /* local client addr:port -> identity */
AIMESH_SOCKHASH(fastpath_sockets, struct sock_tuple, MAX_FASTPATH_SOCKETS);                    /* own 4-tuple -> TCP socket */
AIMESH_MAP("hash", struct sock_tuple, struct fastpath_state, fastpath_state, MAX_FASTPATH_SOCKETS); /* own 4-tuple -> mode, bytes */
AIMESH_MAP("percpu_array", __u32, __u64, verdict_counters, COUNTER_SLOTS);                     /* slot -> count (see abi.h) */
AIMESH_MAP("percpu_hash", struct decision_count_key, __u64, decision_counts, MAX_DECISION_KEYS); /* (src, dst, hook, verdict) -> count */
AIMESH_RINGBUF(decision_events, RINGBUF_PAGES);                                                /* struct decision_event */
AIMESH_RINGBUF(agent_events, 16);                                                              /* struct agent_event */
AIMESH_RINGBUF(flow_events, FLOW_RINGBUF_PAGES);                                               /* struct flow_event */
AIMESH_MAP("lru_hash", __u64, struct capture_sock, capture_connect, MAX_CAPTURE_SOCKETS);      /* pid_tgid -> connect in progress (fd, then what to capture) */
AIMESH_MAP("hash", struct capture_sock_key, struct capture_sock, capture_sockets, MAX_CAPTURE_SOCKETS); /* (tgid, fd) -> captured socket; not LRU: full is counted; the agent drops entries of exited processes */
AIMESH_MAP("percpu_array", __u32, struct capture_cursor, capture_cursor, 1);                /* 0 -> where the copy of the call in progress is (this CPU) */
AIMESH_RINGBUF(capture_events, CAPTURE_RINGBUF_PAGES);                                         /* struct capture_event + 256, 1024 or CAPTURE_CHUNK bytes */
AIMESH_MAP("lru_hash", __u64, struct tls_call, tls_calls, MAX_CAPTURE_SOCKETS);             /* pid_tgid -> SSL_* call in progress (bpf/tls.c) */
AIMESH_MAP("lru_hash", struct tls_ssl_key, __u32, tls_ssl_fd, MAX_CAPTURE_SOCKETS);          /* (tgid, SSL *) -> fd of its captured socket */
AIMESH_MAP("lru_hash", __u64, struct gateway_origin, gateway_pending, MAX_GATEWAY_ORIGINS);   /* socket cookie -> origin of a connect handed to the gateway, until established */
AIMESH_MAP("lru_hash", struct gateway_client_key, struct gateway_origin, gateway_origin, MAX_GATEWAY_ORIGINS); /* client local addr:port -> origin; the gateway reads and deletes it at accept */

#endif /* AIMESH_MAPS_H */
