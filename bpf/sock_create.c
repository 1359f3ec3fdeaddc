/* cgroup sock_create (AF_INET/AF_INET6 sockets only; the kernel runs no cgroup hook for AF_PACKET): remember the
 * cgroup the socket is made in. The kernel charges a socket to that cgroup for good (skb and egress programs see it);
 * connect and sendmsg judge the socket as it too (lib/identity.h socket_cgroup_id), so a process that moves itself
 * into another cgroup cannot take that cgroup's identity for the sockets it opened before the move.
 *   writes: socket_cgroup (sk storage)
 */
#include "programs.h"

int aimesh_sock_create(struct bpf_sock *sk)
{
	__u64 *cg = socket_cgroup.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (cg)
		*cg = bpf_get_current_cgroup_id();
	return 1;   /* never refuses a socket: raw sockets are judged per packet by bpf/sock_egress.c */
}
