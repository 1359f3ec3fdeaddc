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

static __always_inline struct decision_event *decision_reserve(void)
{
	struct decision_event *ev = decision_events.ringbuf_reserve(sizeof(struct decision_event));
	if (!ev)
		counter_add(COUNTER_DECISION_EVENTS_LOST);
	return ev;
}

#endif
