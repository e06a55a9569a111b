"""The rules a VM's settings follow (pure): its name, environment variables, sizes and tags, the defaults, and
the words random names are made of. Every frontend's input reaches :class:`~ussycode.services.vms.VmService`
through these."""

from __future__ import annotations

import re
import secrets

from ussycode.errors import UsageError
from ussycode.types import RESERVED_NAMES, VM_NAME_RE
from ussycode.validate import printable_text

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")
MAX_ENV = 64
MAX_ENV_VALUE = 4096
DEFAULT_CPU, DEFAULT_MEMORY_MB, DEFAULT_DISK_GB = 1, 1024, 5

_ADJECTIVES = ("mild", "brave", "calm", "eager", "fuzzy", "gentle", "happy", "jolly", "kind", "lucky", "merry",
               "nimble", "proud", "quiet", "rapid", "shy", "swift", "tidy", "witty", "zesty", "bold", "crisp",
               "dusty", "fancy", "grand", "hazy", "icy", "lively", "misty", "noble", "plucky", "rusty")
_NOUNS = ("owl", "fox", "otter", "panda", "tiger", "koala", "lynx", "heron", "badger", "bison", "crane", "dingo",
          "eagle", "ferret", "gecko", "ibis", "jackal", "lemur", "moose", "newt", "orca", "puffin", "quail",
          "raven", "seal", "tapir", "urchin", "vole", "walrus", "yak", "zebra", "wombat")


def validate_vm_name(name: str) -> str:
    printable_text(name, "VM name", max_len=30, allow_empty=False)
    if not VM_NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid VM name {name[:40]!r}: use 3-30 characters: lower-case letters, digits and '-', "
            "starting with a letter and not ending with '-'"
        )
    if name in RESERVED_NAMES:
        raise UsageError(f"the name {name!r} is reserved; pick another")
    return name


def parse_env(pairs: list[str]) -> dict[str, str]:
    if len(pairs) > MAX_ENV:
        raise UsageError(f"at most {MAX_ENV} --env values")
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        printable_text(key, "--env name", max_len=64)
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise UsageError(f"invalid --env {pair[:60]!r}: expected KEY=VALUE with KEY like MY_VAR")
        if key.upper().startswith("USSYCODE_"):
            raise UsageError(f"{key} is set by ussycode and cannot be overridden")
        printable_text(value, f"value of --env {key}", max_len=MAX_ENV_VALUE)
        env[key] = value
    return env


def check_sizes(cpu: int, memory_mb: int, disk_gb: int) -> None:
    if not 1 <= cpu <= 64:
        raise UsageError("--cpu must be between 1 and 64")
    if not 256 <= memory_mb <= 262144:
        raise UsageError("--memory must be between 256 and 262144 (MB)")
    if not 1 <= disk_gb <= 2048:
        raise UsageError("--disk must be between 1 and 2048 (GB)")


def random_vm_name(suffix: bool = False) -> str:
    """``adjective-noun`` (with a random hex suffix when ``suffix``); the caller checks it is free."""
    name = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"
    return f"{name}-{secrets.token_hex(2)}" if suffix else name
