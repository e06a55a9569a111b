"""The managed Caddy's Go runtime settings and log config (pure)."""

from __future__ import annotations

from pathlib import Path

from ussycode.proxy.manager import PROXY_LOGGER, caddy_logging, go_runtime_env

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


def test_caddys_log_leaves_out_the_proxy_unless_debugging() -> None:
    default = caddy_logging(Path("/d/caddy.log"))["logs"]["default"]
    assert default["level"] == "INFO" and default["exclude"] == [PROXY_LOGGER] == ["http.handlers.reverse_proxy"]
    assert default["writer"]["filename"] == "/d/caddy.log" and default["sampling"]["first"] == 20
    debug = caddy_logging(Path("/d/caddy.log"), debug=True)["logs"]["default"]
    assert debug["level"] == "DEBUG" and "exclude" not in debug
    assert {k: v for k, v in debug.items() if k != "level"} == {k: v for k, v in default.items()
                                                                  if k not in ("level", "exclude")}
