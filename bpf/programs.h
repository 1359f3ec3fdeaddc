/* Common prelude of every aimesh program file: the contract, the maps and the helpers, in that order. */
#ifndef AIMESH_PROGRAMS_H
#define AIMESH_PROGRAMS_H
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include "include/abi.h"
#include "include/maps.h"
#include "lib/addr.h"
#include "lib/emit.h"
#include "lib/identity.h"
#include "lib/policy.h"
#include "lib/redirect.h"
#include "lib/sockops.h"
#include "lib/fastpath.h"
#include "lib/flow.h"
#include "lib/capture.h"
#endif
