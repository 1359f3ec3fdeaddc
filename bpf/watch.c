/* Tracepoints that keep identities current:
 *   cgroup:cgroup_mkdir      -> agent_events (the agent classifies the new cgroup within milliseconds)
 *   cgroup:cgroup_rmdir      -> deletes cgroup_identity[id], cgroup_inherit[id]
 *   task:task_newtask        -> copies the parent's process_identity[tgid] to a new process (not a thread)
 *   sched:sched_process_exec -> deletes process_identity[tgid] (a process identity follows the executable), then
 *                               agent_events when process selectors exist (CFG_F_WATCH_EXEC)
 *   sched:sched_process_exit -> deletes process_identity[tgid] when the last thread of the process exits
 *   reads: runtime_config; writes: agent_events, cgroup_identity, cgroup_inherit, process_identity, runtime_config, verdict_counters
 */
#include "programs.h"

#ifndef CLONE_THREAD
#define CLONE_THREAD 0x00010000   /* uapi/linux/sched.h */
#endif

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
	cgroup_inherit.delete(&id);
	return 0;
}

/* A child made by fork keeps its parent's identity until it execs. task_newtask rather than sched_process_fork: it
 * carries clone_flags (a thread shares its tgid's entry already and needs none) and, like sched_process_fork, runs in
 * the parent before the child is first woken, so the child never runs without its entry. A full map fails closed: the
 * child would pass for its cgroup's identity, so unmanaged counts as governed and enforced (CFG_F_UNMANAGED_CLOSED;
 * the agent sees COUNTER_PROCESS_IDENTITY_FULL and keeps the flag on in runtime_config). */
TRACEPOINT_PROBE(task, task_newtask)
{
	if (args->clone_flags & CLONE_THREAD)
		return 0;
	__u32 parent = bpf_get_current_pid_tgid() >> 32;
	__u32 *id = process_identity.lookup(&parent);
	if (!id)
		return 0;
	__u32 child = args->pid, ident = *id;
	if (process_identity.update(&child, &ident) == 0)
		return 0;
	counter_add(COUNTER_PROCESS_IDENTITY_FULL);
	__u32 zero = 0;
	struct runtime_config *cfg = runtime_config.lookup(&zero);
	if (cfg)
		cfg->flags |= CFG_F_UNMANAGED_CLOSED;   /* not atomic (bcc compiles for BPF v2): the agent is the only other writer */
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	process_identity.delete(&tgid);   /* the agent assigns the new executable's identity from the event */
	const struct runtime_config *cfg = config_get();
	if (!cfg || !(cfg->flags & CFG_F_WATCH_EXEC))
		return 0;
	struct agent_event *ev = agent_reserve();
	if (!ev)
		return 0;
	ev->kind = AGENT_EV_EXEC;
	ev->path[0] = 0;
	ev->pid = tgid;
	ev->cgroup_id = bpf_get_current_cgroup_id();
	agent_events.ringbuf_submit(ev, 0);
	return 0;
}

/* Fires per thread: the main thread may end (pthread_exit) while others run on as the same process. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	if (!args->group_dead)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	process_identity.delete(&tgid);
	return 0;
}
