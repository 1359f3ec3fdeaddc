/* SPDX-License-Identifier: Apache-2.0
 * Every aimesh map, one "what -> what" line each. Included once, by bpf/programs.h.
 * Generation-keyed maps (gen in the key) are double-buffered: the agent writes the inactive generation, flips
 * runtime_config.active_gen, then deletes the old one, so a reload is atomic for every program run.
 * decision_events and flow_events are submitted with BPF_RB_NO_WAKEUP: waking the agent per event made every connect
 * pay for a wakeup; the agent drains them on a short timer instead. agent_events (rare) wake it at once.
 */
#ifndef AIMESH_MAPS_H
#define AIMESH_MAPS_H
#include "abi.h"

BPF_ARRAY(runtime_config, struct runtime_config, 1);                                  /* 0 -> live generation, flags */
BPF_HASH(cgroup_identity, __u64, __u32, MAX_CGROUPS);                                  /* cgroup id -> identity */
BPF_HASH(process_identity, __u32, __u32, MAX_PROCESSES);                               /* tgid -> identity */
BPF_LPM_TRIE(endpoint_identity, struct endpoint_key, __u32, MAX_ENDPOINTS);            /* (gen, port, prefix) -> identity */
BPF_HASH(local_endpoint_identity, struct local_endpoint_key, __u32, MAX_LOCAL_ENDPOINTS); /* bound (addr, port, proto) -> identity */
BPF_HASH(local_address, struct local_endpoint_key, __u8, 1024);                        /* this host's addresses (port 0) -> 1 */
BPF_HASH(identity_info, struct identity_key, struct identity_info, MAX_IDENTITIES);    /* (id, gen) -> governed/mode/lifecycle */
BPF_HASH(policy_verdict, struct policy_key, struct policy_value, MAX_POLICIES);        /* (src, dst, port, proto, gen) -> allow */
BPF_HASH(redirect_service, struct redirect_key, struct redirect_value, MAX_REDIRECTS); /* (src, dst, gen) -> backend set */
BPF_HASH(redirect_backend, struct backend_key, struct backend, MAX_BACKENDS);          /* (index, gen) -> backend address */
BPF_SK_STORAGE(dialed_address, struct dialed);                                         /* socket -> address it dialed */
BPF_TABLE("lru_hash", struct socket_peer_key, struct dialed, udp_reverse_nat, MAX_REVERSE_NAT); /* (cookie, backend) -> dialed */
BPF_HASH(udp_flows, struct socket_peer_key, struct udp_flow, MAX_UDP_FLOWS);              /* (cookie, remote) -> UDP counters; not LRU: full is counted, never a silent eviction; the agent removes idle entries */
BPF_SK_STORAGE(flow_state, struct flow_origin);                                         /* TCP socket -> identities, start */
BPF_TABLE("lru_hash", struct local_endpoint_key, struct peer_origin, local_peer, MAX_LOCAL_PEERS); /* local client addr:port -> identity */
BPF_SOCKHASH(fastpath_sockets, struct sock_tuple, MAX_FASTPATH_SOCKETS);               /* own 4-tuple -> TCP socket */
BPF_HASH(fastpath_state, struct sock_tuple, struct fastpath_state, MAX_FASTPATH_SOCKETS); /* own 4-tuple -> mode, bytes */
BPF_PERCPU_ARRAY(verdict_counters, __u64, COUNTER_SLOTS);                              /* slot -> count (see abi.h) */
BPF_RINGBUF_OUTPUT(decision_events, RINGBUF_PAGES);                                    /* struct decision_event */
BPF_RINGBUF_OUTPUT(agent_events, 16);                                                  /* struct agent_event */
BPF_RINGBUF_OUTPUT(flow_events, FLOW_RINGBUF_PAGES);                                   /* struct flow_event */

#endif /* AIMESH_MAPS_H */
