"""The managed Caddy's Go runtime settings (pure)."""

from __future__ import annotations

from ussycode.proxy.manager import go_runtime_env

GIB = 2**30


def test_gc_settings_are_ours_by_default() -> None:
    assert go_runtime_env({}, 24 * GIB) == {"GOGC": "400", "GOMEMLIMIT": "3072MiB"}


def test_memory_limit_has_a_floor_on_small_machines() -> None:
    assert go_runtime_env({}, GIB)["GOMEMLIMIT"] == "256MiB"
    assert go_runtime_env({}, 0)["GOMEMLIMIT"] == "256MiB"


def test_the_operators_settings_win_each_on_its_own() -> None:
    assert go_runtime_env({"GOGC": "100"}, 24 * GIB) == {"GOGC": "100", "GOMEMLIMIT": "3072MiB"}
    assert go_runtime_env({"GOMEMLIMIT": "1GiB", "PATH": "/bin"}, 24 * GIB) == {"GOGC": "400", "GOMEMLIMIT": "1GiB"}
    assert go_runtime_env({"GOGC": ""}, 24 * GIB)["GOGC"] == "400"  # empty means unset, as Go reads it
