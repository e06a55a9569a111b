"""One duration parser, one error renderer (SSH and /exec, with evidence)."""

from __future__ import annotations

import datetime as dt

import pytest

from ussycode.api import exec as api_exec
from ussycode.auth import tokens
from ussycode.commands.registry import render_error
from ussycode.durations import DurationError, format_duration, parse_duration
from ussycode.errors import NotFound, RuntimeFailure, UsageError
from ussycode.services import shares
from ussycode.ssh import lobby


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("12H", 43200), (" 7d ", 604800),
                                               ("2w", 1209600), ("1y", 31536000)])
def test_one_grammar(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "10", "d", "1.5h", "-1d", "1 d", "01d", "1dd", "9999999s"])
def test_one_grammar_rejects(text: str) -> None:
    with pytest.raises(DurationError, match="duration"):
        parse_duration(text)


def test_callers_bound_it_and_share_its_rules() -> None:
    assert tokens.parse_duration("2w") == shares.parse_duration("2w")
    with pytest.raises(UsageError, match="longest is 1y"):
        shares.parse_duration("2y")
    with pytest.raises(ValueError, match="shortest is 1m"):
        tokens.parse_duration("30s")
    assert format_duration(dt.timedelta(days=14)) == "2w"


def test_one_renderer_for_ssh_and_exec() -> None:
    assert lobby.render_error is render_error and api_exec.render_error is render_error
    boot = RuntimeFailure("VM web failed to start", evidence="$ qemu-system-x86_64 -m 512\n--- console tail ---\n"
                          + "\n".join(f"line {i}" for i in range(40)))
    text, status = render_error(boot)
    assert status == 1 and text.startswith("error: VM web failed to start\n")
    assert "line 39" in text and "line 20" not in text  # the last 15 lines of evidence
    assert render_error(UsageError("bad", usage="usage: new [--name N]")) == ("error: bad\nusage: new [--name N]", 2)
    assert render_error(NotFound("no VM named 'x'")) == ("error: no VM named 'x'", 1)
    assert render_error(KeyError("bug")) == ("error: internal error; it has been logged", 1)


def test_qemu_and_firecracker_share_code_by_composition(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ussycode.runtime.firecracker import FirecrackerRuntime
    from ussycode.runtime.qemu import QemuRuntime
    from ussycode.runtime.vmm import VmmHost

    assert not issubclass(FirecrackerRuntime, QemuRuntime)
    qemu = QemuRuntime(tmp_path, images=None, run_dir=tmp_path / "run" / "qemu")  # type: ignore[arg-type]
    fc = FirecrackerRuntime(tmp_path, images=None, run_dir=tmp_path / "run" / "firecracker")
    assert isinstance(qemu.vmm, VmmHost) and isinstance(fc.vmm, VmmHost) and qemu.vmm is not fc.vmm
    assert qemu.paths("a").vm_dir == tmp_path / "qemu" / "vms" / "a"
    assert fc.paths("a").vm_dir == tmp_path / "firecracker" / "vms" / "a"
    assert str(fc.paths("a").run_dir).startswith(str(tmp_path / "run" / "firecracker"))  # under the data dir
