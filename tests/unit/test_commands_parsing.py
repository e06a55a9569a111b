import datetime as dt

import pytest

from ussycode.commands.registry import REGISTRY, load_all, lookup, split
from ussycode.errors import QuotaExceeded, RateLimited, StateError, UsageError
from ussycode.services.quotas import check_count, check_size, effective_limits
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.users import validate_handle
from ussycode.services.vm_rules import parse_env, validate_vm_name
from ussycode.store.users import User
from ussycode.types import Limits, TrustLevel, VmStatus, check_transition


def test_plain_lines_split_as_shlex_splits_them() -> None:
    import random
    import shlex

    rng = random.Random(7)
    alphabet = "ab-_=.,:/@%+ \t\r\n09Z"
    for _ in range(2000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert split(line) == shlex.split(line, posix=True), repr(line)
    # what str.split would split but shlex does not: left to shlex
    for line in ("a\x0bb", "a\xa0b", "a\u2028b", "a\x1cb", "é b"):
        assert split(line) == shlex.split(line, posix=True), repr(line)


def test_split_is_posix() -> None:
    assert split("new --name=box1 --env 'A=hello world'") == ["new", "--name=box1", "--env", "A=hello world"]
    assert split('tag box1 "x y"') == ["tag", "box1", "x y"]
    assert split("ls   -l") == ["ls", "-l"]


@pytest.mark.parametrize("line", ["new --name='unbalanced", 'tag "x', "a\x00b", "x" * (64 * 1024 + 1)])
def test_split_rejects_bad_lines(line: str) -> None:
    with pytest.raises(UsageError):
        split(line)


def test_registry_has_the_contract_commands() -> None:
    load_all()
    for name in ("help", "whoami", "ls", "new", "start", "stop", "restart", "rm", "rename", "tag", "cp",
                 "ssh-key", "ssh"):
        assert name in REGISTRY, name
    assert lookup("delete") is REGISTRY["rm"]


def test_parser_errors_are_usage_errors() -> None:
    load_all()
    with pytest.raises(UsageError) as err:
        REGISTRY["new"].parser.parse_args(["--cpu=lots"])
    assert "invalid int value" in err.value.user_message
    assert err.value.usage.startswith("usage: new")
    with pytest.raises(UsageError):
        REGISTRY["rm"].parser.parse_args([])
    with pytest.raises(UsageError):
        REGISTRY["ssh-key"].parser.parse_args(["frobnicate"])


@pytest.mark.parametrize("name", ["ab1", "box1", "a-b-c", "x" * 30])
def test_valid_vm_names(name: str) -> None:
    assert validate_vm_name(name) == name


@pytest.mark.parametrize("name", ["a", "ab", "1box", "Box", "box-", "x" * 31, "bo_x", "root", "../x", "bøx"])
def test_invalid_vm_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_vm_name(name)


@pytest.mark.parametrize("handle,ok", [("demo", True), ("ab", True), ("a", False), ("Demo", True),
                                       ("9lives", False), ("x" * 21, False), ("root", False), ("a-", False)])
def test_handles(handle: str, ok: bool) -> None:
    if ok:
        assert validate_handle(handle) == handle.lower()
    else:
        with pytest.raises(UsageError):
            validate_handle(handle)


def test_env_parsing() -> None:
    assert parse_env(["A=1", "B_2=x=y", "EMPTY="]) == {"A": "1", "B_2": "x=y", "EMPTY": ""}
    for bad in (["NOEQUALS"], ["1A=x"], ["USSYCODE_VM_NAME=x"], ["A=" + "x" * 5000], ["A=\x00"]):
        with pytest.raises(UsageError):
            parse_env(bad)
    with pytest.raises(UsageError):
        parse_env([f"K{i}=v" for i in range(65)])


def _person(level: TrustLevel, quota: Limits | None = None) -> User:
    return User("u1", "someone", None, level, dt.datetime(2026, 1, 1), quota=quota)


def test_quotas_name_the_limit() -> None:
    check_size(_person(TrustLevel.NEWBIE), 1, 2048, 5)
    with pytest.raises(QuotaExceeded, match="vCPU limit"):
        check_size(_person(TrustLevel.NEWBIE), 2, 1024, 5)
    with pytest.raises(QuotaExceeded, match="memory limit"):
        check_size(_person(TrustLevel.NEWBIE), 1, 4096, 5)
    with pytest.raises(QuotaExceeded, match="disk limit"):
        check_size(_person(TrustLevel.CITIZEN), 1, 1024, 26)
    check_size(_person(TrustLevel.ADMIN), 64, 262144, 2048)
    check_count(_person(TrustLevel.NEWBIE), 2)
    with pytest.raises(QuotaExceeded, match="VM limit reached: you have 3 of 3"):
        check_count(_person(TrustLevel.NEWBIE), 3)


def test_a_quota_override_replaces_only_the_keys_it_names() -> None:
    raised = _person(TrustLevel.NEWBIE, Limits(5, None, None, 10))
    assert effective_limits(raised) == Limits(5, 1, 2048, 10)
    check_count(raised, 4)
    check_size(raised, 1, 2048, 10)
    with pytest.raises(QuotaExceeded, match="6 VMs|5 of 5 VMs allowed for your quota"):
        check_count(raised, 5)
    with pytest.raises(QuotaExceeded, match="your quota allows 1 per VM"):
        check_size(raised, 2, 1024, 5)
    check_count(_person(TrustLevel.ADMIN), 10_000)


def test_rate_limiter() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    for _ in range(3):
        limiter.take("u")
    with pytest.raises(RateLimited) as err:
        limiter.take("u")
    assert err.value.retry_after >= 1
    limiter.take("other")  # buckets are per key


def test_state_machine() -> None:
    check_transition("b", VmStatus.STOPPED, VmStatus.RUNNING)
    with pytest.raises(StateError, match="b is creating; it cannot become creating"):
        check_transition("b", VmStatus.CREATING, VmStatus.CREATING)


@pytest.mark.parametrize(("line", "prompt", "command", "json"), [
    # what OpenSSH sends for: ssh host new --name=ai1 --prompt="write a hello page and serve it on 8080"
    ("new --name=ai1 --prompt=write a hello page and serve it on 8080", "write a hello page and serve it on 8080",
     None, False),
    ("new --prompt write a page --json --name=x", "write a page", None, True),
    ("new --prompt='a quoted prompt' --json", "a quoted prompt", None, True),
    ("new --command=echo hi there --prompt=do --it now", "do --it now", "echo hi there", False),
    ("new --name=x --prompt=-v means verbose --agent=pi", "-v means verbose", None, False),
])
def test_free_text_flags_gather_unquoted_words(line: str, prompt: str, command: str | None, json: bool) -> None:
    from ussycode.commands.registry import load_all, lookup, split

    load_all()
    cmd = lookup("new")
    assert cmd is not None
    ns = cmd.parse(split(line)[1:])
    assert (ns.prompt, ns.command, ns.json) == (prompt, command, json)


def test_a_suspension_reason_may_arrive_unquoted() -> None:
    from ussycode.commands.registry import load_all, lookup, split

    load_all()
    cmd = lookup("admin")
    assert cmd is not None
    # ssh host admin suspend bob --reason="crypto mining" --json
    ns = cmd.parse(split("admin suspend bob --reason=crypto mining --json")[1:])
    assert (ns.sub, ns.handle, ns.reason, ns.json) == ("suspend", "bob", "crypto mining", True)


def test_free_text_flags_change_nothing_else() -> None:
    from ussycode.commands.registry import gather_text

    args = ["--name=x", "stray", "--prompt"]
    assert gather_text(args, ("--prompt",), ["--name", "--prompt"]) == args  # argparse reports both
    assert gather_text(["a", "b"], (), []) == ["a", "b"]


def test_a_bare_command_parses_to_its_defaults_every_time() -> None:
    """A command without words reuses its first parse: each caller still gets its own namespace, equal to what
    argparse gives, and words after the name are parsed as always."""
    load_all()
    checked = set()
    for cmd in REGISTRY.values():
        try:
            want = vars(cmd.parser.parse_args([]))
        except UsageError:  # a command that needs words fails the same way every time
            with pytest.raises(UsageError):
                cmd.parse([])
            with pytest.raises(UsageError):
                cmd.parse([])
            continue
        first, second = cmd.parse([]), cmd.parse([])
        assert vars(first) == vars(second) == want, cmd.name
        assert first is not second
        first.help = "changed by a handler"
        assert cmd.parse([]).help is False
        checked.add(cmd.name)
    assert {"whoami", "ls", "help"} <= checked, checked
    whoami = REGISTRY["whoami"]
    assert whoami.parse([]).json is False and whoami.parse(["--json"]).json is True
    assert whoami.parse([]).json is False
    with pytest.raises(UsageError):
        whoami.parse(["--nope"])


def test_a_default_converted_at_each_parse_is_not_reused() -> None:
    import argparse

    from ussycode.commands.registry import Command, _Parser

    calls = []

    def stamp(text: str) -> str:
        calls.append(text)
        return f"{text}#{len(calls)}"

    parser = _Parser(prog="t", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--when", type=stamp, default="now")

    async def handler(ctx: object, a: argparse.Namespace) -> int:
        return 0

    cmd = Command("t", "test", handler, parser)
    assert [cmd.parse([]).when for _ in range(3)] == ["now#1", "now#2", "now#3"]
