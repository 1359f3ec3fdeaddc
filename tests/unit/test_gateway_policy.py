"""The gateway's pure parts: policy from the config's sections, its JSON file, `decide`, and the budget book under
any interleaving (hypothesis)."""
from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from agent.gateway.budget import BudgetBook, Exceeded, Limits, Reservation
from agent.gateway.policy import (DEFAULT_OUTPUT_RESERVATION, GatewayPolicy, Outcome, PolicyError, TlsMode,
                                  budget_refusal, decide)

CFG = {
    "mode": "enforce",
    "identities": [
        {"name": "chat-frontend", "kind": "process"},
        {"name": "batch", "kind": "process", "mode": "audit"},
        {"name": "openai", "kind": "external", "endpoints": ["162.159.140.0/24:443"],
         "llm": {"protocol": "openai", "gateway": "enforce", "tls": "intercept",
                 "upstream_ca": "/etc/aimesh/upstream-ca.pem", "api_key_file": "/etc/aimesh/openai.key",
                 "models": [{"name": "gpt-4-0613",
                             "deprecated": {"sunset": "2026-06-30T00:00:00Z", "successor": "gpt-4o"}},
                            {"name": "gpt-3.5-turbo", "deprecated": {"sunset": "2026-01-01"}}]}},
        {"name": "claude", "kind": "external", "endpoints": ["10.0.0.1:8080"], "mode": "audit",
         "llm": {"protocol": "anthropic"}}],
    "policies": [
        {"from": "chat-frontend", "to": "openai", "ports": [443], "models": ["gpt-4o*", "text-embedding-3-*"],
         "max_tokens": 4096, "tokens_per_minute": 20000, "requests_per_minute": 600, "tokens_per_day": 2000000},
        {"from": "chat-frontend", "to": "claude"},
        {"from": "chat-frontend", "to": "no-llm-here"}],
}
BEFORE = datetime(2026, 5, 1, tzinfo=timezone.utc)
AFTER = datetime(2026, 7, 1, tzinfo=timezone.utc)


def _pol() -> GatewayPolicy:
    return GatewayPolicy.from_config_dict(CFG, {"chat-frontend": 7, "openai": 9})


def test_from_config_dict_and_json_round_trip():
    p = _pol()
    assert set(p.destinations) == {"openai", "claude"} and [r.name for r in p.rules] == ["policies[0]", "policies[1]"]
    d = p.destinations["openai"]
    assert (d.tls, d.upstream_ca, d.api_key_file, d.endpoints) == (
        TlsMode.INTERCEPT, "/etc/aimesh/upstream-ca.pem", "/etc/aimesh/openai.key", ("162.159.140.0/24:443",))
    assert d.models[0].sunset == datetime(2026, 6, 30, tzinfo=timezone.utc) and d.models[0].successor == "gpt-4o"
    assert d.models[1].sunset == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert p.destinations["claude"].tls is TlsMode.NONE and p.audit_for("chat-frontend", "claude")
    assert not p.audit_for("chat-frontend", "openai")
    assert GatewayPolicy.from_json(p.to_json()) == p
    assert p.identity_name(9) == "openai"


@pytest.mark.parametrize("bad, field", [
    ({"policies": [{"from": "", "to": "openai"}]}, "policies[0].from"),
    ({"policies": [{"from": "a", "to": "openai", "max_tokens": -1}]}, "policies[0].max_tokens"),
    ({"gateway": {"mode": "loose"}}, "gateway.mode"),
    ({"identities": [{"name": "x", "llm": {"tls": "sideways"}}]}, "identities[0].llm.tls"),
    ({"identities": [{"name": "x", "llm": {"models": [{"name": "m", "deprecated": {"sunset": "soon"}}]}}]},
     "identities[0].llm.models[0].deprecated.sunset"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(PolicyError, match=field.replace("[", r"\[").replace("]", r"\]")):
        GatewayPolicy.from_config_dict(bad)


def test_bad_policy_file_is_one_line():
    with pytest.raises(PolicyError, match="not JSON"):
        GatewayPolicy.from_json("{")
    with pytest.raises(PolicyError, match="format"):
        GatewayPolicy.from_json('{"format": 99}')


def test_decide_models_globs_ports_and_caps():
    p = _pol()
    ok = decide(p, "chat-frontend", "openai", 443, "gpt-4o-mini", 100, 50, BEFORE)
    assert (ok.outcome, ok.policy, ok.sent_model, ok.reserve_tokens) == (Outcome.SERVED, "policies[0]",
                                                                         "gpt-4o-mini", 150)
    no = decide(p, "chat-frontend", "openai", 443, "o1", 100, 50, BEFORE)
    assert (no.outcome, no.reason, no.refusal.status, no.refusal.code) == (
        Outcome.REFUSED, "model_not_allowed", 403, "model_not_allowed")
    assert all(x in no.refusal.message for x in ("chat-frontend", "'o1'", "policies[0]"))
    assert decide(p, "chat-frontend", "openai", 8443, "gpt-4o", 1, 1, BEFORE).reason == "no_policy"
    assert decide(p, "other", "openai", 443, "gpt-4o", 1, 1, BEFORE).reason == "no_policy"
    big = decide(p, "chat-frontend", "openai", 443, "gpt-4o", 5000, 10, BEFORE)
    assert (big.outcome, big.refusal.status, big.refusal.error_type) == (Outcome.REFUSED, 400, "invalid_request_error")
    absent = decide(p, "chat-frontend", "openai", 443, "gpt-4o", None, 10, BEFORE)
    assert absent.reserve_tokens == 10 + 4096       # the cap bounds the output when the request names none
    anyc = decide(p, "chat-frontend", "claude", 8080, "whatever", None, 10, BEFORE)
    assert anyc.outcome is Outcome.SERVED and anyc.reserve_tokens == 10 + DEFAULT_OUTPUT_RESERVATION


def test_decide_cap_max_tokens():
    cfg = {**CFG, "policies": [{**CFG["policies"][0], "cap_max_tokens": True}]}
    d = decide(GatewayPolicy.from_config_dict(cfg), "chat-frontend", "openai", 443, "gpt-4o", 9000, 10, BEFORE)
    assert (d.outcome, d.max_tokens, d.reserve_tokens) == (Outcome.SERVED, 4096, 4106) and "capped" in d.reason


def test_decide_lifecycle_before_and_after_sunset():
    p = _pol()
    before = decide(p, "chat-frontend", "openai", 443, "gpt-4-0613", 10, 10, BEFORE)
    # before the sunset the old name is served only if a policy allows it: here none does
    assert before.deprecated and before.sent_model == "gpt-4-0613" and before.outcome is Outcome.REFUSED
    after = decide(p, "chat-frontend", "openai", 443, "gpt-4-0613", 10, 10, AFTER)
    assert (after.outcome, after.requested_model, after.sent_model, after.deprecated) == (
        Outcome.SERVED, "gpt-4-0613", "gpt-4o", True)
    gone = decide(p, "chat-frontend", "openai", 443, "gpt-3.5-turbo", 10, 10, AFTER)
    assert (gone.outcome, gone.reason, gone.refusal.status) == (Outcome.REFUSED, "model_retired", 404)


def test_decide_audit_global_and_per_identity():
    p = GatewayPolicy.from_config_dict({**CFG, "gateway": {"mode": "audit"}})
    d = decide(p, "chat-frontend", "openai", 443, "o1", 10, 10, BEFORE)
    assert d.outcome is Outcome.WOULD_DENY and d.reason == "model_not_allowed" and d.refusal.status == 403
    assert decide(_pol(), "intruder", "claude", 8080, "x", 1, 1, BEFORE).outcome is Outcome.WOULD_DENY
    assert decide(_pol(), "batch", "openai", 443, "o1", 1, 1, BEFORE).outcome is Outcome.WOULD_DENY   # source audit
    assert decide(_pol(), "chat-frontend", "openai", 443, "o1", 1, 1, BEFORE).outcome is Outcome.REFUSED


def test_refusal_shapes():
    r = budget_refusal("tokens_per_day", 10, "a", "b", _pol().rules[0])
    assert (r.status, r.error_type, dict(r.headers)) == (429, "insufficient_quota", {"x-should-retry": "false"})
    assert b'"type": "rate_limit_error"' in budget_refusal("tokens_per_minute", 1.5, "a", "b",
                                                            _pol().rules[0]).body("anthropic")
    assert dict(budget_refusal("requests_per_minute", 1.5, "a", "b", _pol().rules[0]).headers)["retry-after-ms"] \
        == "1500"


# -- budgets ---------------------------------------------------------------------------------------------------------
def test_budget_windows_roll_and_release():
    now = [600.0]
    b = BudgetBook(lambda: now[0])
    lim = Limits(tokens_per_minute=100, requests_per_minute=2, tokens_per_day=250)
    r1 = b.reserve("k", lim, 60)
    assert isinstance(r1, Reservation)
    assert isinstance(b.reserve("k", lim, 50), Exceeded)              # 60 reserved + 50 > 100
    b.settle(r1, 20)
    r2 = b.reserve("k", lim, 50)
    assert isinstance(r2, Reservation) and b.committed("k") == (20, 50)
    b.release(r2)
    x = b.reserve("k", lim, 1)
    assert isinstance(x, Exceeded) and x.kind == "requests_per_minute" and 0 < x.retry_after_s <= 60
    assert b.reserve("k", lim, 101).kind == "request_too_large"
    now[0] += 60                                                       # next minute
    r3 = b.reserve("k", lim, 100)
    assert isinstance(r3, Reservation)
    b.settle(r3, 100)
    now[0] += 60
    r4 = b.reserve("k", lim, 100)
    b.settle(r4, 100)
    now[0] += 60
    assert b.reserve("k", lim, 40).kind == "tokens_per_day"            # 20 + 100 + 100 + 40 > 250


ops = st.lists(st.tuples(st.sampled_from(["reserve", "settle", "release"]), st.integers(0, 400),
                         st.integers(0, 10**6)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(ops=ops, budget=st.integers(1, 2000))
def test_budget_any_interleaving_never_overspends(ops, budget):
    """Served total (settled usage, each at most its reservation) never exceeds budget + one reservation."""
    b = BudgetBook(lambda: 120.0)
    lim = Limits(tokens_per_minute=budget)
    open_: list[Reservation] = []
    served = 0
    biggest = 0
    for op, n, pick in ops:
        if op == "reserve":
            r = b.reserve("k", lim, n)
            if isinstance(r, Reservation):
                open_.append(r)
                biggest = max(biggest, n)
        elif open_:
            r = open_.pop(pick % len(open_))
            if op == "settle":
                used = min(n, r.tokens)
                b.settle(r, used)
                served += used
            else:
                b.release(r)
        settled, reserved = b.committed("k")
        assert settled == served and settled + reserved <= budget + biggest
        assert served <= budget + biggest
    for r in open_:
        b.settle(r, r.tokens)
        served += r.tokens
    assert served <= budget + biggest


def test_budget_threads_do_not_overspend():
    b = BudgetBook(lambda: 120.0)
    lim = Limits(tokens_per_minute=1000)
    admitted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            r = b.reserve("k", lim, 7)
            if isinstance(r, Reservation):
                with lock:
                    admitted.append(7)
    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(admitted) <= 1000 and b.counters.admitted == len(admitted) == 142


def test_from_config_model_with_lists_of_identities():
    from agent.config import Config
    cfg = Config.model_validate({
        "identities": [{"name": "web", "kind": "service"}, {"name": "api", "kind": "service"},
                       {"name": "openai", "kind": "external", "endpoints": ["10.1.0.0/16:443"], "mode": "audit"}],
        "policies": [{"from": ["web", "api"], "to": "openai", "ports": [443]}]})
    p = GatewayPolicy.from_config(cfg)
    assert [(r.name, r.source, r.destination, r.ports) for r in p.rules] == [
        ("policies[0]", "web", "openai", (443,)), ("policies[0]", "api", "openai", (443,))]
    d = p.destinations["openai"]
    assert (d.protocol, d.tls, d.audit, d.endpoints) == ("auto", TlsMode.NONE, True, ("10.1.0.0/16:443",))
