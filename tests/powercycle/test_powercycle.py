"""The short form of the power-cycle harness (the long one: python -m tests.powercycle.harness)."""

from tests.powercycle.harness import run


def test_power_cycles_under_load_lose_no_acknowledged_message(tmp_path):
    outcome = run(tmp_path, kills=8, senders=8, seed=5, max_uptime=0.8, sigterm_every=4)
    print("\n" + outcome.summary())
    assert outcome.kills == 6 and outcome.clean_stops == 2
    assert len(outcome.acked) >= 20  # the load really ran between the cuts
    assert not outcome.lost, f"lost acknowledged messages: {sorted(outcome.lost)}"
    assert not outcome.refused_delivered, sorted(outcome.refused_delivered)
