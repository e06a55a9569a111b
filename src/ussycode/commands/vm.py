"""VM commands: ls, new, start, stop, restart, rm, rename, tag, cp, ssh."""

from __future__ import annotations

import argparse
import shlex

from ussycode.commands.context import CommandContext
from ussycode.commands.output import table, vm_json
from ussycode.commands.registry import _Parser, command
from ussycode.errors import UsageError
from ussycode.services.agents import validate_command, validate_prompt
from ussycode.services.vm_rules import DEFAULT_CPU, DEFAULT_DISK_GB, DEFAULT_MEMORY_MB, parse_env
from ussycode.store.vms import Vm

AGENTS = ("pi", "opencode", "none")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _vm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", help="VM name")


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-l", dest="long", action="store_true", help="long listing (sizes, URL)")
    _json_flag(p)


@command("ls", "list your VMs", group="vm", args=_ls_args)
async def ls(ctx: CommandContext, a: argparse.Namespace) -> int:
    vms = await ctx.services.vms.list(ctx.actor)
    agents = await ctx.services.agents.states([v.id for v in vms]) if ctx.services.agents else {}
    setups = await ctx.services.agents.setups([v.id for v in vms]) if ctx.services.agents else {}
    if a.json:
        ctx.out.json([{**vm_json(ctx.services, v), **({"agent": agents[v.id]} if v.id in agents else {}),
                       **({"setup": setups[v.id]} if v.id in setups else {})} for v in vms])
        return 0
    if not vms:
        ctx.out.print("no VMs yet. create one with: new")
        return 0
    def status(v: Vm) -> str:
        pending = ctx.services.vms.pending(v.id)
        return f"{v.status} ({pending})" if pending else str(v.status)

    if a.long:
        mail = ctx.services.mail
        states = await mail.receive_states([v.id for v in vms]) if mail is not None else {}
        rows = [[v.name, status(v), v.image, str(v.cpu), f"{v.memory_mb}MB", f"{v.disk_gb}GB",
                 ctx.services.vms.url(v.name), "on" if states.get(v.id, (False, None))[0] else "off",
                 ",".join(v.tags)] for v in vms]
        ctx.out.print(table(rows, ["name", "status", "image", "cpu", "mem", "disk", "url", "mail", "tags"]))
        for v in vms:
            if v.id in setups:
                ctx.out.print(f"{v.name}: template {setups[v.id]['template']}, setup {setups[v.id]['state']} "
                              "(~/.ussycode/setup.log)")
            if v.id in agents:
                ctx.out.print(f"{v.name}: agent {agents[v.id]['name']} {agents[v.id]['state']} "
                              "(~/.ussycode/agent.log)")
            notice = states.get(v.id, (False, None))[1]
            if notice:
                ctx.out.print(f"{v.name}: {notice} (read them, then: share receive-email {v.name} on)")
    else:
        rows = [[v.name, status(v), v.image, ctx.services.vms.url(v.name)] for v in vms]
        ctx.out.print(table(rows, ["name", "status", "image", "url"]))
    return 0


def _new_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="VM name (default: a random adjective-noun)")
    p.add_argument("--image", help="image (default: the server's default image)")
    p.add_argument("--cpu", type=int, default=None, help=f"vCPUs (default {DEFAULT_CPU})")
    p.add_argument("--memory", type=int, default=None, help=f"memory in MB (default {DEFAULT_MEMORY_MB})")
    p.add_argument("--disk", type=int, default=None, help=f"disk in GB (default {DEFAULT_DISK_GB})")
    p.add_argument("--template", default=None, help="start from a template (see 'template list')")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--agent", choices=AGENTS, default=None,
                   help="the AI agent an interactive login starts (default: the server's --default-agent)")
    p.add_argument("--prompt", default=None, help="after boot, the agent works on this unattended "
                                                  "(~/.ussycode/agent.log; ls shows its state)")
    p.add_argument("--command", default=None, help="a shell command run once after the first boot, as the VM's "
                                                   "user (~/.ussycode/command.log)")
    _json_flag(p)


@command("new", "create and start a VM", group="vm", args=_new_args, text_flags=("--prompt", "--command"))
async def new(ctx: CommandContext, a: argparse.Namespace) -> int:
    tmpl = ctx.services.templates.get(a.template) if a.template and ctx.services.templates else None
    if a.template and tmpl is None:
        raise UsageError("templates are not available on this server")
    spec = tmpl.spec if tmpl else None
    env = {**(spec.env if spec else {}), **parse_env(a.env)}
    agent = a.agent or (spec.agent if spec else None) or ctx.services.settings.default_agent
    env["USSYCODE_AGENT"] = agent
    prompt = validate_prompt(a.prompt or (spec.prompt if spec else None))
    command_line = validate_command(a.command)
    if prompt and agent == "none":
        raise UsageError("--prompt needs an agent: use --agent=pi or --agent=opencode")

    async def progress(msg: str) -> None:
        if not a.json:
            ctx.out.print(f"  {msg}…")

    def pick(flag: int | None, key: str, default: int) -> int:
        value = getattr(spec, key) if spec else None
        return flag if flag is not None else value if value is not None else default

    vm = await ctx.services.vms.create(ctx.actor, name=a.name, image=a.image or (spec.image if spec else None),
                                       cpu=pick(a.cpu, "cpu", DEFAULT_CPU),
                                       memory_mb=pick(a.memory, "memory_mb", DEFAULT_MEMORY_MB),
                                       disk_gb=pick(a.disk, "disk_gb", DEFAULT_DISK_GB), env=env, progress=progress)
    extra: dict[str, object] = {}
    setup = tmpl.setup if tmpl else ""
    if (prompt or command_line or setup) and ctx.services.agents is not None:
        if setup:
            await progress(f"running the {tmpl.name} template's setup" if tmpl else "setting up")
        await ctx.services.agents.launch(vm.id, agent, prompt=prompt, command=command_line, setup=setup,
                                         template=tmpl.name if tmpl else "")
        if prompt:
            extra["agent"] = {"name": agent, "state": "running"}
        if setup:
            extra["setup"] = (await ctx.services.agents.setups([vm.id])).get(vm.id)
    if spec and spec.public_ports and ctx.services.shares is not None:
        for port in spec.public_ports:
            await ctx.services.shares.set_public(ctx.actor, vm.name, True, port)
    if a.json:
        ctx.out.json({**vm_json(ctx.services, vm), **extra})
    else:
        _print_ready(ctx, vm.name, vm.image)
    return 0


def _print_ready(ctx: CommandContext, name: str, image: str) -> None:
    ctx.out.print(f"{name} is running ({image})")
    ctx.out.print(f"  url: {ctx.services.vms.url(name)}")
    ctx.out.print(f"  ssh: {ctx.services.vms.ssh_command(name)}")


def _vm_json_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    _json_flag(p)


@command("start", "start a stopped VM", group="vm", args=_vm_json_args)
async def start(ctx: CommandContext, a: argparse.Namespace) -> int:
    vm = await ctx.services.vms.start(ctx.actor, a.vm)
    ctx.out.json(vm_json(ctx.services, vm)) if a.json else ctx.out.print(f"{vm.name} started")
    return 0


@command("stop", "stop a VM (its disk is kept)", group="vm", args=_vm_json_args)
async def stop(ctx: CommandContext, a: argparse.Namespace) -> int:
    vm = await ctx.services.vms.stop(ctx.actor, a.vm)
    ctx.out.json(vm_json(ctx.services, vm)) if a.json else ctx.out.print(f"{vm.name} stopped")
    return 0


@command("restart", "stop and start a VM", group="vm", args=_vm_json_args)
async def restart(ctx: CommandContext, a: argparse.Namespace) -> int:
    vm = await ctx.services.vms.restart(ctx.actor, a.vm)
    ctx.out.json(vm_json(ctx.services, vm)) if a.json else ctx.out.print(f"{vm.name} restarted")
    return 0


def _rm_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


@command("rm", "delete a VM, its disk, routes and shares", group="vm", args=_rm_args, aliases=("delete",))
async def rm(ctx: CommandContext, a: argparse.Namespace) -> int:
    vm = await ctx.services.vms.get(ctx.actor, a.vm)
    if not a.yes:
        if not ctx.interactive:
            raise UsageError(f"rm needs confirmation; run 'rm {vm.name} --yes' to delete it without asking")
        answer = await ctx.ask(f"this deletes {vm.name} and its disk for good. type the name to confirm: ")
        if (answer or "").strip() != vm.name:
            ctx.out.print("cancelled.")
            return 1
    await ctx.services.vms.remove(ctx.actor, vm.name)
    ctx.out.print(f"{vm.name} removed")
    return 0


def _rename_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", help="current name")
    p.add_argument("new", help="new name")
    _json_flag(p)


@command("rename", "rename a VM (its URL follows)", group="vm", args=_rename_args)
async def rename(ctx: CommandContext, a: argparse.Namespace) -> int:
    vm = await ctx.services.vms.rename(ctx.actor, a.old, a.new)
    ctx.out.json(vm_json(ctx.services, vm)) if a.json else ctx.out.print(f"{a.old} is now {vm.name}")
    return 0


def _tag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", dest="delete", action="store_true", help="remove the tag")
    _vm_arg(p)
    p.add_argument("tag", help="tag")


@command("tag", "add (or with -d remove) a tag on a VM", group="vm", args=_tag_args)
async def tag(ctx: CommandContext, a: argparse.Namespace) -> int:
    changed = await ctx.services.vms.tag(ctx.actor, a.vm, a.tag, remove=a.delete)
    verb = "removed from" if a.delete else "added to"
    ctx.out.print(f"tag {a.tag} {verb} {a.vm}" if changed else f"nothing to do: {a.vm} "
                  f"{'does not have' if a.delete else 'already has'} tag {a.tag}")
    return 0


def _cp_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    p.add_argument("new", nargs="?", help="name of the copy (default: <vm>-copy)")
    _json_flag(p)


@command("cp", "copy a VM and its disk into a new VM", group="vm", args=_cp_args)
async def cp(ctx: CommandContext, a: argparse.Namespace) -> int:
    vm = await ctx.services.vms.copy(ctx.actor, a.vm, a.new)
    if a.json:
        ctx.out.json(vm_json(ctx.services, vm))
    else:
        _print_ready(ctx, vm.name, vm.image)
    return 0


def _ssh_args(p: argparse.ArgumentParser) -> None:
    _vm_arg(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="command to run (default: a shell)")


@command("ssh", "open a shell (or run a command) in a VM", group="vm", args=_ssh_args)
async def ssh(ctx: CommandContext, a: argparse.Namespace) -> int:
    if ctx.attach is None:
        raise UsageError("ssh works only over SSH; from a terminal use: " + ctx.services.vms.ssh_command(a.vm))
    vm = await ctx.services.vms.get(ctx.actor, a.vm)
    return await ctx.attach(vm.name, guest_command(a.command))


def guest_command(argv: list[str]) -> str | None:
    """The command line the guest's shell runs for ``ssh <vm> <command…>`` (pure).

    The lobby split the line like a shell, so the words are quoted again for the guest's shell: ``printf '%s|'
    'a  b' 'c;d'`` reaches it as those three arguments. One word is passed as it is, like OpenSSH does with a
    single argument, so ``ssh web 'ls | wc -l'`` runs a pipeline in the guest.
    """
    if not argv:
        return None
    if len(argv) == 1:
        return argv[0]
    return shlex.join(argv)


def _template_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sub", required=True, parser_class=_Parser, metavar="{list}")
    lst = sub.add_parser("list", add_help=False, help="the templates 'new --template=<name>' can start from")
    lst.add_argument("--json", action="store_true")


@command("template", "VM templates: template list [--json]; new --template=<name>", group="vm", args=_template_args)
async def template(ctx: CommandContext, a: argparse.Namespace) -> int:
    if ctx.services.templates is None:
        raise UsageError("templates are not available on this server")
    found = ctx.services.templates.all()
    if a.json:
        ctx.out.json([t.as_json() for t in found])
        return 0
    ctx.out.print(table([[t.name, t.spec.image or "(default)", t.spec.description] for t in found],
                        ["name", "image", "description"]))
    return 0
