/* Counting and emitting decisions: every verdict is counted per CPU; a full ring buffer is counted, never silent. */
#ifndef AIMESH_LIB_EMIT_H
#define AIMESH_LIB_EMIT_H

static __always_inline void counter_add(__u32 slot)
{
	__u64 *c = verdict_counters.lookup(&slot);
	if (c)
		*c += 1;
}

static __always_inline const struct runtime_config *config_get(void)
{
	__u32 zero = 0;
	return runtime_config.lookup(&zero);
}

/* Count one decision by identity pair (read at scrape time). An insert that loses a race with another CPU's insert of
 * the same key finds it on the second lookup. */
static __always_inline void decision_count(__u32 src, __u32 dst, __u8 hook, __u8 verdict, __u8 flags)
{
	struct decision_count_key k = { .src = src, .dst = dst, .hook = hook, .verdict = verdict,
					.deprecated = (flags & EV_F_DEPRECATED) ? 1 : 0 };
	__u64 *c = decision_counts.lookup(&k);
	if (c) {
		*c += 1;
		return;
	}
	__u64 one = 1;
	if (decision_counts.insert(&k, &one) == 0)
		return;
	c = decision_counts.lookup(&k);
	if (c)
		*c += 1;
	else
		counter_add(COUNTER_DECISION_KEYS_FULL);
}

/* A ring event per decision only where the agent needs one: not for a plain allow (the flow record at close and
 * decision_counts cover it) unless a flow log asks for every decision. */
static __always_inline int decision_event_wanted(const struct runtime_config *cfg, __u8 verdict)
{
	return verdict != VERDICT_ALLOWED || (cfg->flags & CFG_F_ALL_DECISIONS);
}

static __always_inline struct decision_event *decision_reserve(void)
{
	struct decision_event *ev = decision_events.ringbuf_reserve(sizeof(struct decision_event));
	if (!ev)   /* one retry: a reservation can fail with room to spare under contention (see flow_reserve) */
		ev = decision_events.ringbuf_reserve(sizeof(struct decision_event));
	if (!ev)
		counter_add(COUNTER_DECISION_EVENTS_LOST);
	return ev;
}

#endif
