"""`python -m agent.gateway --policy FILE --origin-pin PATH --listen ADDR --records SOCK --ca-dir DIR`: the gateway
process. Wiring only: SIGHUP re-reads the policy file (new requests only), SIGTERM/SIGINT stop it."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

from agent.gateway.ca import CAError, NodeCA
from agent.gateway.policy import GatewayPolicy, PolicyError
from agent.gateway.records import RecordSender
from agent.gateway.server import Gateway, GatewayOrigin, GatewaySettings, OriginLookup, StaticOrigins

log = logging.getLogger("aimesh.gateway")


class KernelOrigins:
    """gwk's kernel-backed OriginTable (agent/gateway/origin.py), identity numbers turned into names with the
    numbering the policy file carries (`identity_numbers`)."""

    def __init__(self, pin_path: str, policy: "PolicyRef") -> None:
        from agent.gateway.origin import OriginTable
        self._table = OriginTable(pin_path)
        self._policy = policy

    def lookup(self, peer_ip: str, peer_port: int) -> GatewayOrigin | None:
        o = self._table.lookup(peer_ip, peer_port)
        if o is None:
            return None
        p = self._policy.policy
        src, dst = p.identity_name(int(o.src_id)), p.identity_name(int(o.dst_id))
        if src is None or dst is None:
            return None
        return GatewayOrigin(address=str(o.address), port=int(o.port), source=src, destination=dst,
                             tls=bool(o.tls_expected), cookie=int(o.cookie))


class PolicyRef:
    def __init__(self, policy: GatewayPolicy) -> None:
        self.policy = policy


def _static(path: str) -> StaticOrigins:
    """Test hook: [{peer_ip, peer_port (0: any), address, port, source, destination, tls}]."""
    s = StaticOrigins()
    for e in json.loads(Path(path).read_text()):
        s.add(e["peer_ip"], int(e.get("peer_port", 0)),
              GatewayOrigin(e["address"], int(e["port"]), e["source"], e["destination"], bool(e.get("tls"))))
    return s


def _listen(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen {v!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def _run(args: argparse.Namespace) -> int:
    ref = PolicyRef(GatewayPolicy.from_json(Path(args.policy).read_text()))
    origins: OriginLookup = _static(args.origins_file) if args.origins_file else KernelOrigins(args.origin_pin, ref)
    host, port = args.listen
    settings = GatewaySettings(host=host, port=port, max_body=args.max_body, header_timeout_s=args.header_timeout,
                               body_timeout_s=args.body_timeout, upstream_ca=args.upstream_ca)
    ca = NodeCA(args.ca_dir) if args.ca_dir else None
    records = RecordSender(args.records)
    gw = Gateway(ref.policy, origins, records, ca, settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            ref.policy = GatewayPolicy.from_json(Path(args.policy).read_text())
        except (OSError, PolicyError) as e:
            log.error("policy reload failed, keeping the previous one: %s", e)
            return
        gw.reload(ref.policy)
        log.info("policy reloaded from %s", args.policy)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    addr = await gw.start()
    print(f"listening {addr[0]}:{addr[1]}", flush=True)
    await stop.wait()
    await gw.close()
    records.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.gateway")
    p.add_argument("--policy", required=True, help="gateway-policy.json written by the agent")
    p.add_argument("--origin-pin", default=None, help="pinned gateway_origin map")
    p.add_argument("--origins-file", default=None, help=argparse.SUPPRESS)   # tests: static origins
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 15001))
    p.add_argument("--records", default=None, help="unix datagram socket of the agent")
    p.add_argument("--ca-dir", default=None, help="node CA directory (intercept)")
    p.add_argument("--upstream-ca", default=None, help=argparse.SUPPRESS)    # tests: default upstream roots
    p.add_argument("--max-body", type=int, default=8 << 20)
    p.add_argument("--header-timeout", type=float, default=10.0)
    p.add_argument("--body-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if not args.origins_file and not args.origin_pin:
        p.error("--origin-pin is required")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return asyncio.run(_run(args))
    except (OSError, PolicyError, CAError, ValueError) as e:
        print(f"aimesh-gateway: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
