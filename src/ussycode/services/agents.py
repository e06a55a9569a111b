"""What ``new --command`` and ``new --prompt`` start in a fresh VM, and the agent's state.

Both run once, after the first boot, as the VM's user, detached from the command that made the VM (``new`` returns
as soon as the VM accepts SSH): ``--command`` through ``sh -c`` with its output in ``~/.ussycode/command.log``;
``--prompt`` as the VM's agent working unattended (``pi -p <prompt>`` or ``opencode run <prompt>``) with its output
in ``~/.ussycode/agent.log``. The prompt and the command reach the VM as arguments, never inside a shell string.
When the agent ends, the VM reports ``done`` or ``failed`` to the metadata service (``POST /agent/state``); the
server records it, and ``ls`` shows ``agent: {name, state}``.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from ussycode.errors import RuntimeFailure, UsageError
from ussycode.runtime.base import Runtime
from ussycode.store.db import Store
from ussycode.store.schema import utcnow, vm_agents, vm_setups
from ussycode.validate import printable_text

log = logging.getLogger(__name__)
MAX_PROMPT = 16_000
MAX_COMMAND = 8_000
STATES = ("running", "done", "failed")
SETUP_TIMEOUT = 600.0  # a template's setup.sh (it runs before `new` returns its JSON)

# The end of each job: POST $body (how the run ended) to the metadata service, with Python or else curl.
REPORT = r'''
report='import sys, urllib.request as u
req = u.Request("http://169.254.169.254/agent/state", data=sys.argv[1].encode(),
                headers={"Content-Type": "application/json"})
u.urlopen(req, timeout=30)'
python3 -c "$report" "$body" \
    || curl -s -X POST -H 'Content-Type: application/json' -d "$body" http://169.254.169.254/agent/state
'''

# The agent's unattended run: $1 agent, $2 prompt, $3 the seconds it may take (then it is stopped, with whatever it
# started). Reports how it ended to the metadata service.
AGENT_JOB = r'''
agent="$1"; prompt="$2"; limit="$3"; cd "$HOME"
export PATH="/usr/local/bin:$PATH"
if ! command -v "$agent" >/dev/null 2>&1; then
    echo "$agent is not installed in this image" >&2; rc=127
else
    case "$agent" in
        opencode) OPENCODE_DISABLE_MODELS_FETCH=1 timeout -k 30 "$limit" opencode run "$prompt"; rc=$? ;;
        *) timeout -k 30 "$limit" "$agent" -p "$prompt"; rc=$? ;;
    esac
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "the agent ran longer than $limit s and was stopped"; fi
fi
if [ "$rc" = 0 ]; then body='{"state": "done"}'; else body='{"state": "failed"}'; fi
echo "agent exited with status $rc"
''' + REPORT

# A template's setup.sh, saved in ~/.ussycode/setup.sh. Reports how it ended, like the agent job.
SETUP_JOB = r'''
cd "$HOME"
sh "$HOME/.ussycode/setup.sh"; rc=$?
if [ "$rc" = 0 ]; then body='{"state": "done", "run": "setup"}'; else body='{"state": "failed", "run": "setup"}'; fi
echo "setup exited with status $rc"
''' + REPORT

# $1 agent, $2 prompt ("" for none), $3 command ("" for none), $4 the agent job above, $5 "setup" when stdin is a
# template's setup.sh, $6 the setup job above, $7 the agent's time limit in seconds. The setup runs first and the
# prompt after it (the agent finds the template's files). The script comes on stdin, not in an argument: no
# process's command line holds it (a `pkill -f` in it would otherwise kill the very shell running it).
RUNNER = r'''
mkdir -p "$HOME/.ussycode"
if [ "$5" = setup ]; then
    cat > "$HOME/.ussycode/setup.sh"
    sh -c "$6" ussycode-setup-job > "$HOME/.ussycode/setup.log" 2>&1 < /dev/null
fi
if [ -n "$3" ]; then
    setsid nohup sh -c "$3" > "$HOME/.ussycode/command.log" 2>&1 < /dev/null &
fi
if [ -n "$2" ]; then
    setsid nohup sh -c "$4" ussycode-agent "$1" "$2" "$7" > "$HOME/.ussycode/agent.log" 2>&1 < /dev/null &
fi
'''


def validate_prompt(text: str | None) -> str:
    if not text:
        return ""
    return printable_text(text, "prompt", max_len=MAX_PROMPT, allow_empty=False)


def validate_command(text: str | None) -> str:
    if not text:
        return ""
    return printable_text(text, "command", max_len=MAX_COMMAND, allow_empty=False)


class AgentService:
    def __init__(self, store: Store, runtime: Runtime, run_seconds: int = 3600) -> None:
        self.store = store
        self.runtime = runtime
        self.run_seconds = run_seconds  # an unattended agent run's limit

    async def launch(self, vm_id: str, agent: str, *, prompt: str = "", command: str = "", setup: str = "",
                     template: str = "") -> None:
        """Start the template's setup, the command and the agent's prompt in the VM (detached); record the runs.

        The setup is waited for (its servers detach themselves) so a prompt's agent finds what it made."""
        if not prompt and not command and not setup:
            return
        if prompt and agent == "none":
            raise UsageError("--prompt needs an agent: use --agent=pi or --agent=opencode")
        if setup:
            await self._mark_running(vm_setups, vm_id, template=template)
        if prompt:
            await self._mark_running(vm_agents, vm_id, name=agent)
        result = await self.runtime.exec(vm_id, ["sh", "-c", RUNNER, "ussycode-run", agent, prompt, command,
                                                   AGENT_JOB, "setup" if setup else "", SETUP_JOB,
                                                   str(self.run_seconds)],
                                         stdin=setup.encode(), timeout=SETUP_TIMEOUT)
        if result.exit_status != 0:
            raise RuntimeFailure("could not start the command or the agent in the VM",
                                 evidence=(result.stdout + result.stderr)[-1000:].decode(errors="replace"))

    async def report(self, vm_id: str, state: str, run: str = "agent") -> bool:
        """The VM says how its agent (or its template's setup) ended; False when there is no such run."""
        if state not in ("done", "failed"):
            raise UsageError("state must be 'done' or 'failed'")
        table = vm_setups if run == "setup" else vm_agents

        def tx(c: sa.Connection) -> bool:
            return bool(c.execute(table.update().where(table.c.vm_id == vm_id, table.c.state == "running")
                                  .values(state=state, updated_at=utcnow())).rowcount)

        return await self.store.write(tx)

    async def _mark_running(self, table: sa.Table, vm_id: str, **values: str) -> None:
        """The VM's run of this kind (agent or setup) starts anew: its one row says ``running``."""
        now = utcnow()

        def tx(c: sa.Connection) -> None:
            c.execute(table.delete().where(table.c.vm_id == vm_id))
            c.execute(table.insert().values(vm_id=vm_id, state="running", updated_at=now, **values))

        await self.store.write(tx)

    async def _runs(self, table: sa.Table, vm_ids: list[str], label: str) -> dict[str, dict[str, Any]]:
        """{VM id: {label: …, "state": …}} of the VMs that have a run of this kind."""
        if not vm_ids:
            return {}

        def read(c: sa.Connection) -> dict[str, dict[str, Any]]:
            rows = c.execute(sa.select(table).where(table.c.vm_id.in_(vm_ids)))
            return {r.vm_id: {label: getattr(r, label), "state": r.state} for r in rows}

        return await self.store.read(read)

    async def setups(self, vm_ids: list[str]) -> dict[str, dict[str, Any]]:
        return await self._runs(vm_setups, vm_ids, "template")

    async def states(self, vm_ids: list[str]) -> dict[str, dict[str, Any]]:
        return await self._runs(vm_agents, vm_ids, "name")
