import json
from pathlib import Path

import pytest

from ussycode.cli import main
from ussycode.config import load_settings
from ussycode.doctor import host_checks, run_doctor


def test_doctor_reports_every_check_and_the_auto_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor(load_settings(data_dir=str(tmp_path)), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in report["checks"]}
    assert {"root", "cgroups", "overlay", "kvm usable", "runtime container", "runtime qemu",
            "runtime firecracker"} <= names
    assert all(c["detail"] for c in report["checks"])  # every missing part says why
    assert report["auto"]["runtime"] in ("firecracker", "qemu", "container") and report["auto"]["reason"]


def test_missing_binaries_say_how_to_get_them() -> None:
    for check in host_checks():
        if not check.ok and "not found" in check.detail:
            assert "install" in check.detail


@pytest.mark.parametrize("argv", [["serve", "--ssh-addr", "nonsense"], ["serve", "--tls", "maybe"],
                                  ["serve", "--config", "/nonexistent/u.toml"]])
def test_serve_refuses_bad_settings(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")
