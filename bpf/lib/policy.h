/* The allow-list decision: governed ends need a policy; audit mode turns a deny into a recorded allow. */
#ifndef AIMESH_LIB_POLICY_H
#define AIMESH_LIB_POLICY_H

struct decision {
	__u32 rule_id;
	__u8  verdict;
	__u8  reason;
	__u8  flags;
	__u8  policy_flags;   /* POLICY_F_* of the policy that allowed it (reason REASON_POLICY) */
};

/* What an identity is in one generation. A user identity the generation does not know (a cgroup or port entry older
 * than the last reload, or one the agent could not write) counts as governed and enforced: a missing entry can deny,
 * never allow. With CFG_F_UNMANAGED_CLOSED (set by the agent while a workload-identity map is full, so some governed
 * workloads may look unmanaged), unmanaged is governed and enforced too. */
static __always_inline __u32 identity_flags_cfg(__u32 id, __u8 gen, __u32 cfg_flags)
{
	struct identity_key k = { .id = id, .gen = gen };
	struct identity_info *info = identity_info.lookup(&k);
	__u32 f = info ? info->flags : (id >= ID_FIRST_USER ? (ID_F_GOVERNED | ID_F_ENFORCE) : 0);
	if (id == ID_UNMANAGED && (cfg_flags & CFG_F_UNMANAGED_CLOSED))
		f |= ID_F_GOVERNED | ID_F_ENFORCE;
	return f;
}

static __always_inline __u32 identity_flags(__u32 id, __u8 gen)
{
	return identity_flags_cfg(id, gen, 0);
}

static __always_inline struct policy_value *policy_lookup(__u8 gen, __u32 src, __u32 dst, __u16 port, __u8 proto)
{
	struct policy_key k = { .src = src, .dst = dst, .port = port, .proto = proto, .gen = gen };
	struct policy_value *v = policy_verdict.lookup(&k);
	if (v)
		return v;
	k.port = 0;
	return policy_verdict.lookup(&k);
}

/* The deny verdict, or audit when no identity that denies is in enforce mode. */
static __always_inline __u8 deny_or_audit(int enforce)
{
	return enforce ? VERDICT_DENIED : VERDICT_AUDIT;
}

/* Port 53 to a resolver the agent listed (resolv.conf and dns_resolvers); port 53 anywhere else is judged. */
static __always_inline int is_dns_to_resolver(const struct runtime_config *cfg, const __u8 *server, __u16 port)
{
	if (port != 53 || !(cfg->flags & CFG_F_DNS_ALLOW))
		return 0;
	struct local_endpoint_key k = {};
	__builtin_memcpy(k.addr, server, 16);
	return dns_resolver.lookup(&k) != NULL;
}

/* server: the address of the serving end (the one the connection is delivered to). */
static __always_inline void decide(struct decision *d, const struct runtime_config *cfg, __u32 src, __u32 dst,
				   const __u8 *server, __u16 port, __u8 proto)
{
	__u8 gen = cfg->active_gen;
	__u32 sf = identity_flags_cfg(src, gen, cfg->flags);
	__u32 df = identity_flags_cfg(dst, gen, cfg->flags);

	d->rule_id = 0;
	d->policy_flags = 0;
	d->flags = (df & ID_F_DEPRECATED) ? EV_F_DEPRECATED : 0;
	d->verdict = VERDICT_ALLOWED;

	if (src == dst && src >= ID_FIRST_USER) {
		d->reason = REASON_SAME_IDENTITY;
	} else if (is_dns_to_resolver(cfg, server, port)) {
		d->reason = REASON_DNS;
	} else if (!(sf & ID_F_GOVERNED) && !(df & ID_F_GOVERNED)) {
		d->reason = REASON_NOT_GOVERNED;
	} else {
		struct policy_value *pv = policy_lookup(gen, src, dst, port, proto);
		if (pv) {
			d->reason = REASON_POLICY;
			d->rule_id = pv->rule_id;
			d->policy_flags = pv->flags;
		} else {
			int enforce = ((sf & ID_F_GOVERNED) && (sf & ID_F_ENFORCE)) ||
				      ((df & ID_F_GOVERNED) && (df & ID_F_ENFORCE));
			d->reason = (df & ID_F_GOVERNED) ? REASON_NO_POLICY_DST : REASON_NO_POLICY_SRC;
			d->verdict = deny_or_audit(enforce);
			return;
		}
	}
	/* Past sunset: the caller redirects to the successor if the lifecycle redirect exists, else this stands. */
	if (df & ID_F_SUNSET) {
		d->reason = REASON_SUNSET;
		d->verdict = deny_or_audit(df & ID_F_ENFORCE);
	}
}

#endif
