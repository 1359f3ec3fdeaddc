"""`dns: allow` opens port 53 to the resolvers: which addresses those are (resolv.conf and dns_resolvers)."""
from __future__ import annotations

import pytest

from agent.config import Config
from agent.identity.host import dns_resolver_keys, resolv_conf_nameservers
from agent.policy.compile import addr16


def test_nameservers_in_order_without_zone_ids_or_junk():
    text = "# comment\nsearch example\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver bogus\n" \
           "nameserver\noptions ndots:5\n"
    assert resolv_conf_nameservers(text) == ["10.0.0.1", "fe80::1"]


def test_keys_merge_resolv_conf_and_config_once_each(tmp_path):
    import ipaddress
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 127.0.0.53\nnameserver ::1\n")
    keys = dns_resolver_keys(["127.0.0.53", "10.96.0.10"], rc)
    assert [bytes(k.addr) for k in keys] == [addr16(ipaddress.ip_address(a))
                                             for a in ("127.0.0.53", "::1", "10.96.0.10")]
    assert [bytes(k.addr) for k in dns_resolver_keys(["10.96.0.10"], tmp_path / "missing")] == \
        [addr16(ipaddress.ip_address("10.96.0.10"))]


def test_a_resolver_that_is_not_an_address_is_refused_naming_it():
    with pytest.raises(ValueError, match="dns_resolvers: .*resolver.example.*not an IP address"):
        Config.model_validate({"dns_resolvers": ["resolver.example"]})
