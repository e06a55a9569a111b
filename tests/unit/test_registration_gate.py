"""Registration limits, the rate limiter's injectable clock, and the role policy: pure, no sleeping."""

from __future__ import annotations

import datetime as dt

import pytest

from ussycode.auth.identity import Actor
from ussycode.auth.policy import Action, can
from ussycode.config import RegistrationMode, load_settings
from ussycode.errors import RateLimited
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.registration import RegistrationGate, address_key
from ussycode.store.users import User
from ussycode.types import TrustLevel


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_per_hour_limiter_refills_evenly_and_check_spends_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter.per_hour(4, clock=clock)
    for _ in range(10):
        limiter.check("a")  # checking never spends
    for _ in range(4):
        limiter.take("a")
    with pytest.raises(RateLimited) as exc:
        limiter.take("a")
    assert 899 <= exc.value.retry_after <= 900  # one more every 15 minutes
    with pytest.raises(RateLimited):
        limiter.check("a")
    limiter.take("b")  # other keys have their own bucket
    clock.now += 899
    with pytest.raises(RateLimited):
        limiter.take("a")
    clock.now += 1
    limiter.take("a")
    with pytest.raises(RateLimited):
        limiter.take("a")
    limiter.refund("a")
    limiter.take("a")
    clock.now += 10 * 3600  # never more than the burst
    for _ in range(4):
        limiter.take("a")
    with pytest.raises(RateLimited):
        limiter.take("a")


@pytest.mark.parametrize(("address", "key"), [
    ("127.0.0.2", "127.0.0.2"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not-an-ip", "not-an-ip"),
])
def test_address_key(address: str, key: str) -> None:
    assert address_key(address) == key


def _gate(per_address: int, per_hour: int, clock: Clock, mode: str = "open") -> RegistrationGate:
    settings = load_settings(registrations_per_address=per_address, registrations_per_hour=per_hour,
                             registration=mode)
    return RegistrationGate(settings, clock=clock)


def test_gate_per_address_and_overall() -> None:
    clock = Clock()
    gate = _gate(2, 3, clock)
    gate.admit("10.0.0.1")
    gate.admit("10.0.0.1")
    with pytest.raises(RateLimited) as exc:
        gate.admit("10.0.0.1")
    assert exc.value.reason == "registration_rate_address"
    assert exc.value.user_message == "too many new accounts from your address; retry in 30 minutes"
    gate.admit("10.0.0.2")  # the third overall
    with pytest.raises(RateLimited) as exc:
        gate.check("10.0.0.3")
    assert exc.value.reason == "registration_rate_global"
    with pytest.raises(RateLimited) as exc:
        gate.admit("10.0.0.3")
    assert exc.value.user_message == "this server is taking too many new accounts right now; retry in 20 minutes"
    # the refused attempt spent nothing from its own address: once the server refills, it gets its full share
    clock.now += 3600
    gate.admit("10.0.0.3")
    gate.admit("10.0.0.3")
    gate.refund("10.0.0.3")
    gate.admit("10.0.0.3")


def test_gate_ipv6_counts_per_64() -> None:
    gate = _gate(1, 100, Clock())
    gate.admit("2001:db8::1")
    with pytest.raises(RateLimited):
        gate.admit("2001:db8::2")
    gate.admit("2001:db8:0:1::1")


def test_gate_mode() -> None:
    assert not _gate(1, 1, Clock()).closed
    closed = _gate(1, 1, Clock(), "closed")
    assert closed.closed and closed.mode is RegistrationMode.CLOSED
    assert "admin add-user" in closed.refuse_closed().user_message


@pytest.mark.parametrize("bad", [{"registration": "maybe"}, {"registrations_per_address": 0},
                                 {"registrations_per_hour": -1}, {"registrations_per_address": "lots"}])
def test_registration_settings_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        load_settings(**bad)


def test_registration_setting_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REGISTRATION", "REGISTRATIONS_PER_ADDRESS", "REGISTRATIONS_PER_HOUR"):
        monkeypatch.delenv(f"USSYCODE_{name}", raising=False)
    s = load_settings()
    assert s.registration is RegistrationMode.OPEN
    assert (s.registrations_per_address, s.registrations_per_hour) == (5, 60)
    monkeypatch.setenv("USSYCODE_REGISTRATION", "closed")
    monkeypatch.setenv("USSYCODE_REGISTRATIONS_PER_HOUR", "7")
    s = load_settings(registrations_per_hour="9")
    assert s.registration is RegistrationMode.CLOSED and s.registrations_per_hour == 9


def _actor(level: TrustLevel) -> Actor:
    return Actor(User("u1", "someone", None, level, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)), source="ssh")


@pytest.mark.parametrize("level", list(TrustLevel))
def test_policy_admin_only_actions(level: TrustLevel) -> None:
    assert can(_actor(level), Action.USER_ADD) is (level is TrustLevel.ADMIN)
    assert can(_actor(level), Action.ADMIN_COMMANDS) is (level in (TrustLevel.OPERATOR, TrustLevel.ADMIN))


def test_registration_flags() -> None:
    from ussycode.cli import SERVE_FLAGS, _settings, build_parser

    ns = build_parser().parse_args(["serve", "--registration", "closed", "--registrations-per-address", "2",
                                    "--registrations-per-hour", "30"])
    s = _settings(ns, SERVE_FLAGS)
    assert (s.registration, s.registrations_per_address, s.registrations_per_hour) == ("closed", 2, 30)
