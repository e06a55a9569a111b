"""Pure builders of the container runtime: launcher argv, firewall, cgroup values, capabilities, guest files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ussycode.errors import NotFound, RuntimeFailure
from ussycode.runtime import disks, netns
from ussycode.runtime.cgroups import CgroupLimits, cgroup_values
from ussycode.runtime.container import caps
from ussycode.runtime.container.argv import BootPaths, boot_argv, exec_argv
from ussycode.runtime.container.guest import authorized_keys_file, env_script, parse_passwd
from ussycode.runtime.container.state import VmState, parse_stat_start_time

# --- capabilities -------------------------------------------------------------------------------------------


def test_dangerous_capabilities_are_dropped() -> None:
    drop = set(caps.caps_to_drop(40))
    for name in ("SYS_ADMIN", "NET_ADMIN", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO", "DAC_READ_SEARCH",
                 "SYS_BOOT", "SYS_TIME", "MKNOD", "NET_RAW", "BPF", "PERFMON", "SYS_RESOURCE"):
        assert caps.CAPS[name] in drop, name
    for name in ("CHOWN", "SETUID", "SETGID", "SYS_CHROOT", "NET_BIND_SERVICE", "AUDIT_WRITE", "KILL"):
        assert caps.CAPS[name] not in drop, name


def test_bounding_mask_matches_keep_set() -> None:
    mask = caps.bounding_mask(40)
    assert mask == sum(1 << caps.CAPS[name] for name in caps.KEEP)
    # Capabilities a newer kernel adds are dropped too (not kept by default).
    assert 41 in caps.caps_to_drop(41)


# --- launcher command lines ---------------------------------------------------------------------------------


def test_boot_argv() -> None:
    paths = BootPaths(lower=Path("/img/rootfs"), disk=Path("/r/disk"), lower_map=Path("/r/lower-map"),
                      disk_map=Path("/r/disk-map"), root=Path("/r/root"))
    argv = boot_argv(
        "/py", paths=paths, hostname="box", netns_path=Path("/run/netns/ussy-x"), init=Path("/g/init.sh"),
        meta=Path("/r/meta"), cgroup_procs=[Path("/cg/a/cgroup.procs"), Path("/cg/b/cgroup.procs")],
        pidfile=Path("/r/init.pid"), id_base=16777216, id_count=65536, memory_mb=512,
        lxcfs=Path("/var/lib/lxcfs"), lxcfs_proc=("meminfo", "uptime"),
    )
    assert argv[:5] == ["/py", "-I", "-m", "ussycode.runtime.container.nsinit", "boot"]
    assert argv[argv.index("--hostname") + 1] == "box"
    assert argv[argv.index("--netns") + 1] == "/run/netns/ussy-x"
    assert argv[argv.index("--id-base") + 1] == "16777216"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cgroup-procs"] == [
        "/cg/a/cgroup.procs", "/cg/b/cgroup.procs"]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--lxcfs-proc"] == ["meminfo", "uptime"]
    from ussycode.runtime.container import nsinit

    parsed: list[object] = []
    orig = nsinit.boot
    nsinit.boot = lambda args: parsed.append(args) or 0  # type: ignore[assignment,func-returns-value]
    try:
        nsinit.main(argv[4:])
    finally:
        nsinit.boot = orig
    args = parsed[0]
    assert (args.id_base, args.id_count, args.memory_mb) == (16777216, 65536, 512)  # type: ignore[attr-defined]
    assert args.lxcfs_proc == ["meminfo", "uptime"]  # type: ignore[attr-defined]
    assert args.disk_map == "/r/disk-map"  # type: ignore[attr-defined]


def test_exec_argv_keeps_the_command_verbatim() -> None:
    argv = exec_argv(
        "/py", pid=42, uid=1000, gid=1000, groups=[1000, 27], cwd="/home/u", env={"A": "x=y z"},
        cgroup_procs=[], argv=["--not-an-option", "-c", "echo hi"],
    )
    assert argv[argv.index("--"):] == ["--", "--not-an-option", "-c", "echo hi"]
    assert argv[argv.index("--env") + 1] == "A=x=y z"
    assert argv[argv.index("--groups") + 1] == "1000,27"


def test_nsinit_parses_what_exec_argv_builds() -> None:
    from ussycode.runtime.container import nsinit

    argv = exec_argv("/py", pid=1, uid=2, gid=3, groups=[], cwd="/", env={}, cgroup_procs=[],
                     argv=["ls", "--", "-x"])
    parser_args = argv[5:]
    parsed: list[object] = []

    def fake_exec(args: object) -> int:
        parsed.append(args)
        return 0

    orig = nsinit.run_exec
    nsinit.run_exec = fake_exec  # type: ignore[assignment]
    try:
        nsinit.main(["exec", *parser_args])
    finally:
        nsinit.run_exec = orig
    args = parsed[0]
    assert args.argv == ["--", "ls", "--", "-x"]  # type: ignore[attr-defined]
    assert (args.pid, args.uid, args.gid) == (1, 2, 3)  # type: ignore[attr-defined]


# --- network ----------------------------------------------------------------------------------------------------

IP_JSON = json.dumps([
    {"ifname": "lo", "flags": ["LOOPBACK", "UP"], "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}]},
    {"ifname": "eth0", "flags": ["UP"], "addr_info": [
        {"local": "192.0.2.2", "prefixlen": 24}, {"local": "fd00::2", "prefixlen": 64},
        {"local": "10.1.2.3", "prefixlen": 16}]},
])


def test_host_addresses_exclude_loopback_and_include_networks() -> None:
    host = netns.parse_ip_addr_json(IP_JSON)
    assert "127.0.0.1" not in host.v4
    assert {"192.0.2.2", "192.0.2.0/24", "10.1.2.3", "10.1.0.0/16"} <= set(host.v4)
    assert {"fd00::2", "fd00::/64"} <= set(host.v6)


def test_nft_ruleset_blocks_private_ranges_and_the_host() -> None:
    rules = netns.nft_ruleset(netns.parse_ip_addr_json(IP_JSON))
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
                "192.0.2.0/24", "fc00::/7", "fe80::/10"):
        assert net in rules, net
    # Overlapping networks are merged (nft rejects overlapping set elements).
    assert "10.1.0.0/16" not in rules and "fd00::/64" not in rules
    assert rules.index("169.254.169.254 accept") < rules.index("reject")
    assert 'oifname "lo" accept' in rules
    assert "policy drop" in rules  # nothing from outside opens a connection in


@pytest.mark.skipif(subprocess.run(["which", "nft"], capture_output=True).returncode != 0, reason="no nft")
def test_nft_ruleset_is_valid_syntax() -> None:
    rules = netns.nft_ruleset(netns.parse_ip_addr_json(IP_JSON))
    proc = subprocess.run(["nft", "--check", "-f", "-"], input=rules, capture_output=True, text=True)
    if "Operation not permitted" in proc.stderr:
        pytest.skip("nft --check needs CAP_NET_ADMIN")
    assert proc.returncode == 0, proc.stderr


def test_pasta_forwards_nothing_and_does_not_map_the_gateway() -> None:
    argv = netns.pasta_argv("ussy-abc", Path("/r/pasta.pid"))
    for flag in ("-t", "-u", "-T", "-U"):
        assert argv[argv.index(flag) + 1] == "none"
    assert "--no-map-gw" in argv
    assert argv[argv.index("--runas") + 1] == "0"
    assert argv[-1] == "/run/netns/ussy-abc"


def test_netns_names_are_short_stable_and_distinct() -> None:
    a, b = netns.netns_name("01HZX0000000000000000000AA"), netns.netns_name("01HZX0000000000000000000AB")
    assert a != b and a == netns.netns_name("01HZX0000000000000000000AA")
    assert len(a) <= 17 and a.startswith("ussy-")


# --- cgroups ---------------------------------------------------------------------------------------------------


def test_cgroup_v1_values() -> None:
    values = cgroup_values("v1", CgroupLimits(cpu=2, memory_mb=512, pids_max=100))
    assert values["memory"]["memory.limit_in_bytes"] == str(512 * 2**20)
    assert values["memory"]["memory.memsw.limit_in_bytes"] == str(512 * 2**20)
    assert values["cpu"] == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "200000"}
    assert values["pids"] == {"pids.max": "100"}


def test_cgroup_v2_values() -> None:
    values = cgroup_values("v2", CgroupLimits(cpu=1, memory_mb=256))
    assert values[""] == {"memory.max": str(256 * 2**20), "memory.swap.max": "0", "cpu.max": "100000 100000",
                          "pids.max": "4096"}


# --- guest files and parsing ---------------------------------------------------------------------------------


def test_env_script_round_trips_through_bash() -> None:
    env = {"PLAIN": "x", "NASTY": "it's \"q\" $HOME `id` \\ ;rm -rf /\nline2", "EMPTY": ""}
    script = env_script(env)
    out = subprocess.run(["bash", "-c", script + 'printf "%s\\0" "$PLAIN" "$NASTY" "$EMPTY"'],
                         capture_output=True, text=True, env={}).stdout
    assert out.split("\0")[:3] == ["x", env["NASTY"], ""]


@pytest.mark.parametrize("bad", ["1X", "A-B", "A B", "A;B", ""])
def test_env_script_rejects_bad_names(bad: str) -> None:
    with pytest.raises((RuntimeFailure, IndexError)):
        env_script({bad: "v"})


def test_authorized_keys() -> None:
    assert authorized_keys_file(("ssh-ed25519 AAA a", "  ", "ssh-rsa BBB b ")) == "ssh-ed25519 AAA a\nssh-rsa BBB b\n"
    with pytest.raises(RuntimeFailure):
        authorized_keys_file(("ssh-ed25519 AAA a\nssh-ed25519 EVIL",))


def test_parse_passwd() -> None:
    passwd = "root:x:0:0:root:/root:/bin/bash\nussycode:x:1000:1000::/home/ussycode:/bin/bash\n"
    group = "root:x:0:\nsudo:x:27:ussycode,other\nussycode:x:1000:\n"
    assert parse_passwd(passwd, group, "ussycode") == (1000, 1000, [1000, 27], "/home/ussycode")
    assert parse_passwd(passwd, group, "root") == (0, 0, [0], "/root")
    with pytest.raises(NotFound):
        parse_passwd(passwd, group, "nobody")


def test_stat_parsing_survives_odd_command_names() -> None:
    line = "123 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 999 20 21"
    assert parse_stat_start_time(line) == ("S", 999)


def test_state_round_trip_ignores_unknown_fields() -> None:
    st = VmState(vm_id="v", image="i", digest="d", disk="/d", netns="n", pid=5, pid_start=6)
    data = st.as_json() | {"from_the_future": 1}
    assert VmState.from_json(data) == st
    with pytest.raises(RuntimeFailure):
        VmState.from_json({"vm_id": "only"})


# --- disks --------------------------------------------------------------------------------------------------------


def test_overlay_options_reject_separators() -> None:
    assert disks.overlay_options(Path("/l"), Path("/u"), Path("/w")) == "lowerdir=/l,upperdir=/u,workdir=/w"
    for bad in ("/a,b", "/a:b"):
        with pytest.raises(RuntimeFailure):
            disks.overlay_options(Path(bad), Path("/u"), Path("/w"))


def test_parse_mountpoints_decodes_escapes() -> None:
    info = "36 25 0:32 / /var/tmp/with\\040space rw,relatime shared:1 - ext4 /dev/loop0 rw\n"
    assert disks.parse_mountpoints(info) == {"/var/tmp/with space"}


def test_sparse_disk_is_exact_size_and_small(tmp_path: Path) -> None:
    if subprocess.run(["which", "mkfs.ext4"], capture_output=True).returncode != 0:
        pytest.skip("no mkfs.ext4")
    disk = tmp_path / "d.ext4"
    disks.create_disk(disk, 1)
    assert disk.stat().st_size == 2**30
    assert disks.allocated_bytes(disk) < 64 * 2**20
    with pytest.raises(FileExistsError):
        disks.create_disk(disk, 1)


def test_slirp4netns_keeps_the_host_loopback_out() -> None:
    argv = netns.slirp4netns_argv("ussy-abc", 7)
    assert argv[0] == "slirp4netns"
    for flag in ("--configure", "--disable-host-loopback", "--enable-seccomp", "--ready-fd=7"):
        assert flag in argv
    assert "--enable-sandbox" not in argv  # it unmounts /run/netns on the host through mount propagation
    assert argv[-3:] == ["--netns-type=path", "/run/netns/ussy-abc", "tap0"]


def test_dns_forwarder_is_the_only_private_address_let_through() -> None:
    host = netns.HostAddresses(("192.0.2.2", "192.0.2.0/24"), ())
    rules = netns.nft_ruleset(host, dns_v4=netns.SLIRP_DNS_V4)
    dns = rules.index("ip daddr 10.0.2.3 udp dport 53 accept")
    assert dns < rules.index("reject")
    assert "ip daddr 10.0.2.3 tcp dport 53 accept" in rules
    assert "10.0.2.3 accept" not in rules  # only port 53, never the whole address
    assert "dport 53" not in netns.nft_ruleset(host)
