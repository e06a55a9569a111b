"""``ussycode`` command line: serve, doctor, image build/list, migrate."""

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
               "log_level", "registration", "registrations_per_address", "registrations_per_hour",
               "smtp_relay", "smtp_relay_user", "smtp_relay_password", "mail_from", "mail_per_hour",
               "mail_unread_limit")


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
    return parser


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
    from ussycode import log
    from ussycode.app import App

    log.setup(settings.log_level)
    asyncio.run(App(settings).run_forever())
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
