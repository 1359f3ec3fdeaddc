/* Connect-time redirect: pick a weighted backend for (src, dst); lifecycle redirects are compiled in the same map. */
#ifndef AIMESH_LIB_REDIRECT_H
#define AIMESH_LIB_REDIRECT_H

static __always_inline struct redirect_value *redirect_lookup(__u8 gen, __u32 src, __u32 dst)
{
	struct redirect_key k = { .src = src, .dst = dst, .gen = gen };
	struct redirect_value *v = redirect_service.lookup(&k);
	if (v)
		return v;
	k.src = ID_NONE;
	return redirect_service.lookup(&k);
}

static __always_inline struct backend *backend_pick(__u8 gen, const struct redirect_value *svc)
{
	if (svc->count == 0 || svc->total_weight == 0)
		return NULL;
	__u32 r = bpf_get_prandom_u32() % svc->total_weight;
	struct backend_key k = { .gen = gen };
	#pragma unroll
	for (int i = 0; i < BACKENDS_PER_SERVICE; i++) {
		if (i >= svc->count)
			break;
		k.index = svc->first_backend + i;
		struct backend *b = redirect_backend.lookup(&k);
		if (!b)
			return NULL;
		if (r < b->cum_weight)
			return b;
	}
	return NULL;
}

#endif
