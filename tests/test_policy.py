"""Whitelists, limits and capacity (S2, S8, S9, S10): pure functions, no I/O."""

from hypothesis import given, strategies as st

from firmware import policy

RULES = dict(sender_rules=["scanner@lan.example", "trusted.example"],
             recipient_rules=["partner.example", ".group.example", "boss@ext.example"],
             max_recipients=500)


def test_rules_match_address_domain_and_subdomains_case_insensitively():
    assert policy.rule_matches("Boss@Ext.Example", "boss@ext.example")
    assert not policy.rule_matches("boss@ext.example", "other@ext.example")
    assert policy.rule_matches("partner.example", "Anyone@PARTNER.example")
    assert not policy.rule_matches("partner.example", "a@sub.partner.example")
    assert not policy.rule_matches("partner.example", "a@evilpartner.example")
    assert policy.rule_matches(".group.example", "a@eu.group.example")
    assert not policy.rule_matches(".group.example", "a@group.example")
    assert not policy.rule_matches(".group.example", "a@evilgroup.example")


def test_sender_rules_come_first():
    d = policy.decide("scanner@lan.example", ["x@anywhere.example"], **RULES)
    assert not d.hold
    d = policy.decide("someone@trusted.example", ["x@anywhere.example"], **RULES)
    assert not d.hold


def test_every_recipient_must_match_to_pass():
    assert not policy.decide("a@lan.example", ["x@partner.example", "y@eu.group.example",
                                               "boss@ext.example"], **RULES).hold
    assert policy.decide("a@lan.example", ["x@partner.example", "y@other.example"],
                         **RULES).hold
    assert policy.decide("", ["x@other.example"], **RULES).hold


def test_more_than_max_recipients_pass_at_once():
    rcpts = [f"r{i}@other.example" for i in range(500)]
    assert policy.decide("a@lan.example", rcpts, **RULES).hold
    assert not policy.decide("a@lan.example", rcpts + ["one@more.example"], **RULES).hold


def test_size_and_capacity_replies():
    assert policy.check_size(None, 10) is None
    assert policy.check_size(10, 10) is None
    reply = policy.check_size(11, 10)
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    usage = policy.Usage(messages=1, bytes=50, max_messages=2, max_bytes=100)
    assert policy.check_capacity(usage) is None
    assert policy.check_capacity(usage, 51).code == 452
    full = policy.Usage(messages=2, bytes=0, max_messages=2, max_bytes=100)
    assert (policy.check_capacity(full).code, policy.check_capacity(full).enhanced) == (
        452, "4.3.1")


@given(st.text(), st.text())
def test_rule_matching_never_raises(rule, address):
    assert policy.rule_matches(rule, address) in (True, False)
