"""``ussycode`` command line: serve, doctor, image build/list, migrate, admin promote/list, backup, restore."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ussycode import __version__
from ussycode.config import Settings, load_settings

# Flags of `serve`, named like the settings they set (CONTRACT §2).
SERVE_FLAGS = ("data_dir", "images_dir", "domain", "ssh_addr", "https_addr", "http_addr", "admin_addr",
               "smtp_addr", "runtime", "tls", "acme_email", "caddy_admin", "database_url", "default_image",
               "default_agent",
               "log_level", "log_format", "registration", "registrations_per_address", "registrations_per_hour",
               "smtp_relay", "smtp_relay_user", "smtp_relay_password", "mail_from", "mail_per_hour",
               "mail_unread_limit", "llm_secret_file", "routussy_url", "routussy_key", "trusted_cidrs")


def _add_setting_flags(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for name in names:
        field = Settings.model_fields[name]
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field.description)
    p.add_argument("--config", type=Path, default=None, help="TOML config file (flags and env override it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ussycode", description="self-hosted dev environments over SSH")
    parser.add_argument("--version", action="version", version=f"ussycode {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the server in the foreground")
    _add_setting_flags(serve, SERVE_FLAGS)
    doctor = sub.add_parser("doctor", help="say what this host can run")
    _add_setting_flags(doctor, ("data_dir", "images_dir", "runtime"))
    doctor.add_argument("--json", action="store_true")
    image = sub.add_parser("image", help="build or list VM images")
    isub = image.add_subparsers(dest="image_cmd", required=True)
    build = isub.add_parser("build", help="build an image with mmdebstrap")
    build.add_argument("--name", default="ussyuntu")
    build.add_argument("--if-missing", action="store_true", help="do nothing when the image is already built")
    _add_setting_flags(build, ("data_dir", "images_dir"))
    lst = isub.add_parser("list", help="list built images")
    _add_setting_flags(lst, ("data_dir", "images_dir"))
    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    _add_setting_flags(migrate, ("data_dir", "database_url"))
    admin = sub.add_parser("admin", help="host-side bootstrap and recovery (works while the server runs)")
    asub = admin.add_subparsers(dest="admin_cmd", required=True)
    promote = asub.add_parser("promote", help="make a user admin (or --tier=operator)")
    promote.add_argument("handle")
    promote.add_argument("--tier", default="admin", choices=["admin", "operator", "citizen", "newbie"])
    _add_setting_flags(promote, ("data_dir", "database_url"))
    alist = asub.add_parser("list", help="list operators and admins")
    alist.add_argument("--json", action="store_true")
    _add_setting_flags(alist, ("data_dir", "database_url"))
    backup = sub.add_parser("backup", help="a consistent copy of the database, taken while the server runs")
    backup.add_argument("--to", required=True, type=Path, help="the backup file to write")
    _add_setting_flags(backup, ("data_dir", "database_url"))
    restore = sub.add_parser("restore", help="bring a backup back (stop the server first)")
    restore.add_argument("file", type=Path)
    _add_setting_flags(restore, ("data_dir", "database_url"))
    return parser


def _host_admin(ns: argparse.Namespace) -> int:
    import json

    from ussycode.errors import RuntimeFailure, UssyError
    from ussycode.services.admin import promote, staff
    from ussycode.store import backup as bk
    from ussycode.store.db import Store
    from ussycode.types import TrustLevel

    settings = _settings(ns, ("data_dir", "database_url"))
    try:
        if ns.cmd == "backup":
            print(bk.backup(settings.db_url, ns.to))
            return 0
        if ns.cmd == "restore":
            print(bk.restore(settings.db_url, ns.file, settings.run_dir))
            return 0
        store = Store(settings.db_url)
        try:
            store.migrate()
            if ns.admin_cmd == "promote":
                user = promote(store, ns.handle, TrustLevel(ns.tier))
                print(f"{user.handle} is now {user.trust_level} (their next lobby command has it; "
                      "their tokens and whoami within 2 s)")
                return 0
            people = staff(store)
            if ns.json:
                print(json.dumps([{"handle": u.handle, "trust_level": str(u.trust_level), "suspended": u.suspended}
                                  for u in people]))
            else:
                for u in people:
                    print(f"{u.handle:<20} {u.trust_level}{'  (suspended)' if u.suspended else ''}")
            return 0
        finally:
            store.close()
    except UssyError as exc:
        print(f"error: {exc.user_message}", file=sys.stderr)
        if isinstance(exc, RuntimeFailure) and exc.evidence:
            print(exc.evidence, file=sys.stderr)
        return exc.exit_code


def _settings(ns: argparse.Namespace, names: tuple[str, ...]) -> Settings:
    flags: dict[str, Any] = {n: getattr(ns, n, None) for n in names}
    return load_settings(ns.config, **flags)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.cmd == "serve":
            return _serve(_settings(ns, SERVE_FLAGS))
        if ns.cmd == "doctor":
            from ussycode.doctor import run_doctor

            code: int = run_doctor(_settings(ns, ("data_dir", "images_dir", "runtime")), as_json=ns.json)
            return code
        if ns.cmd == "image":
            return _image(ns)
        if ns.cmd in ("admin", "backup", "restore"):
            return _host_admin(ns)
        if ns.cmd == "migrate":
            from ussycode.store.db import Store

            store = Store(_settings(ns, ("data_dir", "database_url")).db_url)
            backup = store.migrate()
            print(f"database is up to date{f' (backup: {backup})' if backup else ''}")
            return 0
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            print(f"error: invalid setting {loc}: {err['msg']}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


def _serve(settings: Settings) -> int:
    from ussycode import log, telemetry
    from ussycode.app import App

    log.setup(settings.log_level, settings.log_format)
    telemetry.setup_tracing()  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    try:
        asyncio.run(App(settings).run_forever())
    finally:
        telemetry.shutdown_tracing()  # sends what is batched
    return 0


def _image(ns: argparse.Namespace) -> int:
    from ussycode.errors import UssyError
    from ussycode.runtime.images import ImageStore

    settings = _settings(ns, ("data_dir", "images_dir"))
    store = ImageStore(settings.images_path)
    if ns.image_cmd == "list":
        for img in store.list_built():
            print(f"{img.name:<16} {img.digest[:12]}  {img.path}")
        return 0
    try:
        build = store.ensure_built if ns.if_missing else store.build
        asyncio.run(build(ns.name, progress=lambda line: print(line, flush=True)))
    except UssyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"image {ns.name} built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
