/* Tracepoints that keep identities current:
 *   cgroup:cgroup_mkdir      -> agent_events (the agent classifies the new cgroup within milliseconds)
 *   cgroup:cgroup_rmdir      -> deletes cgroup_identity[id]
 *   sched:sched_process_exec -> agent_events when process selectors exist (CFG_F_WATCH_EXEC)
 *   sched:sched_process_exit -> deletes process_identity[tgid] when the process's main thread exits
 *   reads: runtime_config; writes: agent_events, cgroup_identity, process_identity, verdict_counters
 */
#include "programs.h"

static __always_inline struct agent_event *agent_reserve(void)
{
	struct agent_event *ev = agent_events.ringbuf_reserve(sizeof(struct agent_event));
	if (!ev)   /* one retry: a reservation can fail with room to spare under contention (see flow_reserve) */
		ev = agent_events.ringbuf_reserve(sizeof(struct agent_event));
	if (!ev)
		counter_add(COUNTER_AGENT_EVENTS_LOST);
	return ev;
}

TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	if (args->root != 0)   /* hierarchy 0 is cgroup v2 */
		return 0;
	struct agent_event *ev = agent_reserve();
	if (!ev)
		return 0;
	ev->kind = AGENT_EV_CGROUP_MKDIR;
	ev->pid = 0;
	ev->cgroup_id = args->id;
	ev->path[0] = 0;
	TP_DATA_LOC_READ_STR(ev->path, path, sizeof(ev->path));
	agent_events.ringbuf_submit(ev, 0);
	return 0;
}

TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	if (args->root != 0)
		return 0;
	__u64 id = args->id;
	cgroup_identity.delete(&id);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	const struct runtime_config *cfg = config_get();
	if (!cfg || !(cfg->flags & CFG_F_WATCH_EXEC))
		return 0;
	struct agent_event *ev = agent_reserve();
	if (!ev)
		return 0;
	ev->kind = AGENT_EV_EXEC;
	ev->path[0] = 0;
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->cgroup_id = bpf_get_current_cgroup_id();
	agent_events.ringbuf_submit(ev, 0);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	if ((__u32)pid_tgid != tgid)
		return 0;
	process_identity.delete(&tgid);
	return 0;
}
