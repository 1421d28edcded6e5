"""What happens to a message: hold it or pass it at once, and whether it fits (SPEC S2, S8-S10).

Pure functions of their arguments: no store, no board, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from firmware.smtp import Reply

# RFC 5321 4.5.3.1.8 asks servers to take at least 100 recipients; beyond max_recipients a message
# is relayed at once (S9), and this hard cap keeps one envelope's memory bounded.
MAX_ENVELOPE_RECIPIENTS = 2000

STORE_FULL = Reply.of(452, "4.3.1 Hold store is full, try again later")
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3 Too many recipients")


def too_big(limit: int) -> Reply:
    return Reply.of(552, f"5.3.4 Message too big (the limit is {limit} bytes)")


@dataclass(frozen=True)
class Usage:
    """How full the store is, counting messages still being received."""

    messages: int
    bytes: int
    max_messages: int
    max_bytes: int


def check_capacity(usage: Usage, extra_bytes: int = 0) -> Reply | None:
    """452 when one more message (of `extra_bytes` more) would not fit (S10)."""
    if usage.messages >= usage.max_messages:
        return STORE_FULL
    if usage.bytes + extra_bytes > usage.max_bytes:
        return STORE_FULL
    return None


def check_size(size: int | None, limit: int) -> Reply | None:
    """552 when the declared or counted size is over the per-message limit (S8)."""
    if size is not None and size > limit:
        return too_big(limit)
    return None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def rule_matches(rule: str, address: str) -> bool:
    """A rule is an address, a domain (that domain only) or a `.domain` (its subdomains)."""
    rule = rule.lower()
    address = address.lower()
    if "@" in rule:
        return rule == address
    domain = _domain(address)
    if rule.startswith("."):
        return domain.endswith(rule)
    return domain == rule


def matches_any(rules: Iterable[str], address: str) -> bool:
    return any(rule_matches(rule, address) for rule in rules)


@dataclass(frozen=True)
class Decision:
    hold: bool
    reason: str


def decide(
    sender: str,
    recipients: Iterable[str],
    *,
    sender_rules: Iterable[str],
    recipient_rules: Iterable[str],
    max_recipients: int,
) -> Decision:
    """Hold, or pass at once (S2, S9). Sender rules first; then every recipient must match."""
    recipients = list(recipients)
    if sender and matches_any(sender_rules, sender):
        return Decision(False, "whitelisted sender")
    if len(recipients) > max_recipients:
        return Decision(False, f"more than {max_recipients} recipients")
    recipient_rules = list(recipient_rules)
    if recipients and recipient_rules and all(matches_any(recipient_rules, r) for r in recipients):
        return Decision(False, "every recipient whitelisted")
    return Decision(True, "held")
