"""Command lines for the :mod:`.nsinit` helper (pure; kept apart so importing the runtime never imports it)."""

from __future__ import annotations

from pathlib import Path

HELPER = "ussycode.runtime.container.nsinit"


def boot_argv(
    python: str, *, root: Path, hostname: str, netns_path: Path, init: Path, meta: Path,
    cgroup_procs: list[Path], pidfile: Path,
) -> list[str]:
    """The command line that boots a VM (pure)."""
    return [
        python, "-I", "-m", HELPER, "boot",
        "--root", str(root), "--hostname", hostname, "--netns", str(netns_path), "--init", str(init),
        "--meta", str(meta), "--pidfile", str(pidfile),
        *[arg for p in cgroup_procs for arg in ("--cgroup-procs", str(p))],
    ]


def exec_argv(
    python: str, *, pid: int, uid: int, gid: int, groups: list[int], cwd: str, env: dict[str, str],
    cgroup_procs: list[Path], argv: list[str],
) -> list[str]:
    """The command line that runs ``argv`` inside the VM whose PID 1 has host pid ``pid`` (pure)."""
    out = [
        python, "-I", "-m", HELPER, "exec",
        "--pid", str(pid), "--uid", str(uid), "--gid", str(gid), "--groups", ",".join(map(str, groups)),
        "--cwd", cwd,
    ]
    for key, value in env.items():
        out += ["--env", f"{key}={value}"]
    for p in cgroup_procs:
        out += ["--cgroup-procs", str(p)]
    return out + ["--", *argv]
