"""The bridge's admission decisions (polyfan.web.admission): counts in, decisions out, no sockets."""

from __future__ import annotations

import pytest

from polyfan.web.admission import Admission, Admit, AuthThrottle, Refusal, RefusalLog


def admission(**caps: int) -> Admission:
    base = {
        "max_connections": 1000,
        "max_handshakes": 100,
        "max_handshakes_per_address": 10,
        "max_connections_per_address": 20,
    }
    return Admission(**(base | caps))


def test_an_address_past_its_handshake_cap_is_refused_and_others_are_not() -> None:
    gate = admission()
    assert [gate.admit("a") for _ in range(10)] == [Admit()] * 10
    assert gate.admit("a") is Refusal.ADDRESS_HANDSHAKES
    assert gate.admit("b") == Admit()
    assert (gate.handshakes, gate.connections) == (11, 11)


def test_a_handshake_over_frees_its_address_slot_but_the_connection_still_counts() -> None:
    gate = admission()
    for _ in range(10):
        gate.admit("a")
    gate.handshake_over("a")
    assert gate.admit("a") == Admit()
    assert (gate.handshakes_from("a"), gate.connections_from("a")) == (10, 11)


def test_an_address_past_its_connection_cap_is_refused_even_with_no_handshake_open() -> None:
    gate = admission()
    for _ in range(20):
        assert gate.admit("a") == Admit()
        gate.handshake_over("a")
    assert gate.admit("a") is Refusal.ADDRESS_CONNECTIONS
    gate.closed("a", in_handshake=False)
    assert gate.admit("a") == Admit()


def test_zero_turns_the_per_address_caps_off() -> None:
    gate = admission(max_handshakes_per_address=0, max_connections_per_address=0)
    assert all(gate.admit("proxy") == Admit() for _ in range(100))


def test_a_full_handshake_pool_gives_a_newcomer_the_place_of_the_heaviest_address() -> None:
    gate = admission(max_handshakes=30)
    for address in ("a", "b", "c"):
        for _ in range(10):
            gate.admit(address)
    assert gate.admit("d") == Admit(evict="a")  # a tie: the first of the heaviest
    assert (gate.handshakes, gate.handshakes_from("a"), gate.handshakes_from("d")) == (30, 9, 1)
    assert gate.admit("e") in (Admit(evict="b"), Admit(evict="c"))
    assert gate.handshakes == 30


def test_a_full_pool_refuses_an_address_that_holds_as_much_as_the_heaviest() -> None:
    gate = admission(max_handshakes=16)
    for address in ("a", "b"):
        for _ in range(8):
            gate.admit(address)
    # "a" holding 8 would hold 9 while "b" is left with 7: no gain, refused
    assert gate.admit("a") is Refusal.HANDSHAKES
    gate2 = admission(max_handshakes=20)
    for k in range(20):
        gate2.admit(f"x{k}")
    assert gate2.admit("y") is Refusal.HANDSHAKES  # everyone holds one: nobody to displace


def test_past_the_file_budget_new_connections_are_refused_when_no_handshake_can_give_way() -> None:
    gate = admission(max_connections=5)
    for k in range(5):
        gate.admit(f"c{k}")
        gate.handshake_over(f"c{k}")
    assert gate.admit("new") is Refusal.FILES
    gate.closed("c0", in_handshake=False)
    assert gate.admit("new") == Admit()


def test_past_the_file_budget_a_heavy_address_handshake_gives_way() -> None:
    gate = admission(max_connections=5)
    for _ in range(5):
        gate.admit("a")
    assert gate.admit("b") == Admit(evict="a")
    assert (gate.connections, gate.connections_from("a")) == (5, 4)


def test_closing_every_connection_leaves_no_counts() -> None:
    gate = admission()
    gate.admit("a")
    gate.admit("a")
    gate.handshake_over("a")
    gate.closed("a", in_handshake=False)
    gate.closed("a", in_handshake=True)
    assert (gate.connections, gate.handshakes, gate.heaviest()) == (0, 0, None)


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(max_connections=0, max_handshakes=10)


def test_refusals_are_logged_at_once_then_at_most_once_per_period_with_counts() -> None:
    log = RefusalLog(5.0)
    first = log.refused("handshakes", "10.0.0.1", 100.0)
    assert first == (
        "refused or evicted 1 connection(s) in 0.0 s (handshakes: 1); the last from 10.0.0.1"
    )
    assert log.refused("handshakes", "10.0.0.2", 101.0) is None
    assert log.refused("address_handshakes", "10.0.0.3", 102.0) is None
    assert log.due() == 105.0
    assert log.flush(105.0) == (
        "refused or evicted 2 connection(s) in 4.0 s (address_handshakes: 1, handshakes: 1); "
        "the last from 10.0.0.3"
    )
    assert log.due() is None
    assert log.flush(106.0) is None
    assert log.refused("files", "10.0.0.4", 109.0) is None  # within 5 s of the last line
    assert log.refused("files", "10.0.0.4", 110.5) is not None


def test_an_address_may_fail_its_allowance_then_one_more_every_refill() -> None:
    throttle = AuthThrottle(failures=3, refill=6.0)
    for _ in range(3):
        assert throttle.retry_in("10.0.0.1", 100.0) == 0.0
        throttle.failed("10.0.0.1", 100.0)
    assert throttle.retry_in("10.0.0.1", 100.0) == pytest.approx(6.0)
    assert throttle.retry_in("10.0.0.2", 100.0) == 0.0  # another address is not touched
    assert throttle.retry_in("10.0.0.1", 104.5) == pytest.approx(1.5)
    assert throttle.retry_in("10.0.0.1", 106.0) == 0.0  # one more attempt ...
    throttle.failed("10.0.0.1", 106.0)
    assert throttle.retry_in("10.0.0.1", 106.0) == pytest.approx(6.0)  # ... and no more
    assert throttle.retry_in("10.0.0.1", 106.0 + 3 * 6.0) == 0.0  # refilled
    throttle.failed("10.0.0.1", 200.0)
    throttle.failed("10.0.0.1", 200.0)
    assert throttle.retry_in("10.0.0.1", 200.0) == 0.0  # the bucket holds 3, not more


def test_the_throttle_forgets_refilled_addresses_and_keeps_at_most_its_bound() -> None:
    throttle = AuthThrottle(failures=2, refill=1.0, max_addresses=100)
    for i in range(100):
        throttle.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    throttle.failed("10.1.0.0", 5.0)  # the others have refilled: forgotten
    assert len(throttle) == 1
    for i in range(500):
        throttle.failed(f"10.2.{i // 256}.{i % 256}", 5.0)
        throttle.failed(f"10.2.{i // 256}.{i % 256}", 5.0)
    assert len(throttle) <= 100
    assert throttle.retry_in("10.2.1.243", 5.0) > 0  # the newest are kept


def test_no_failures_allowed_means_no_throttle() -> None:
    throttle = AuthThrottle(failures=0, refill=6.0)
    for _ in range(100):
        throttle.failed("10.0.0.1", 0.0)
    assert throttle.retry_in("10.0.0.1", 0.0) == 0.0
    assert len(throttle) == 0
