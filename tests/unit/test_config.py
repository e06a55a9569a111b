from pathlib import Path

import pytest
from pydantic import ValidationError

from ussycode.cli import SERVE_FLAGS, build_parser
from ussycode.config import Settings, TlsMode, load_settings, parse_addr


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 10, f"setting {name} has no description"


def test_every_contract_flag_exists() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    options = {o for a in serve._actions for o in a.option_strings}
    for flag in ("--data-dir", "--images-dir", "--domain", "--ssh-addr", "--https-addr", "--http-addr",
                 "--admin-addr", "--smtp-addr", "--runtime", "--tls", "--caddy-admin", "--config"):
        assert flag in options
    assert set(SERVE_FLAGS) <= set(Settings.model_fields)


def test_defaults_and_derived_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"USSYCODE_{name.upper()}", raising=False)
    s = load_settings()
    assert s.data_dir == Path("/var/lib/ussycode")
    assert s.ssh_addr == ":2222" and s.https_addr == ":8443" and s.http_addr == "127.0.0.1:8080"
    assert s.admin_addr == "127.0.0.1:9090" and s.smtp_addr == ":2525"
    assert s.tls is TlsMode.INTERNAL and str(s.runtime) == "auto" and s.domain == "localhost"
    moved = load_settings(data_dir="/srv/u")
    assert moved.images_path == Path("/srv/u/images")
    assert moved.db_url == "sqlite:////srv/u/ussycode.db"
    assert moved.host_key_path == Path("/srv/u/ssh_host_ed25519_key")
    assert moved.disks_dir == Path("/srv/u/disks")


def test_precedence_flag_env_toml_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "u.toml"
    toml.write_text('domain = "from-toml.dev"\nssh_addr = ":2000"\nhttp_addr = "127.0.0.1:7000"\n')
    monkeypatch.setenv("USSYCODE_SSH_ADDR", ":3000")
    monkeypatch.setenv("USSYCODE_HTTP_ADDR", "127.0.0.1:7100")
    s = load_settings(toml, http_addr="127.0.0.1:7200")
    assert s.domain == "from-toml.dev"          # TOML over default
    assert s.ssh_addr == ":3000"                 # env over TOML
    assert s.http_addr == "127.0.0.1:7200"       # flag over env
    assert s.admin_addr == "127.0.0.1:9090"      # default


def test_settings_are_frozen() -> None:
    s = load_settings(data_dir="/tmp/x")
    with pytest.raises(ValidationError):
        s.domain = "evil"  # type: ignore[misc]


@pytest.mark.parametrize("bad", [{"ssh_addr": "nonsense"}, {"http_addr": "1.2.3.4:99999"}, {"domain": "a b"},
                                 {"runtime": "docker"}, {"tls": "maybe"}, {"unknown_setting": "x"},
                                 {"log_level": "LOUD"}, {"log_level": ""}])
def test_bad_settings_are_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        load_settings(**bad)


def test_log_level_is_taken_in_any_case() -> None:
    assert load_settings(log_level="debug").log_level == "DEBUG"
    assert load_settings(log_level=" Warning ").log_level == "WARNING"
    assert load_settings().log_level == "INFO"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.toml")


def test_parse_addr() -> None:
    assert parse_addr(":2222") == ("0.0.0.0", 2222)
    assert parse_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_addr("[::1]:22") == ("::1", 22)
    with pytest.raises(ValueError):
        parse_addr("localhost")


def test_public_urls() -> None:
    s = load_settings(data_dir="/tmp/x", domain="Example.COM.", https_addr=":443")
    assert s.domain == "example.com"
    assert s.public_url("box.example.com") == "https://box.example.com"
    off = load_settings(data_dir="/tmp/x", tls="off", https_addr=":8443")
    assert off.public_url("box.localhost") == "http://box.localhost:8443"
