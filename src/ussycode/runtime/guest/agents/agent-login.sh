# ussycode: an interactive SSH login with a terminal starts the VM's agent (USSYCODE_AGENT: pi, opencode or none,
# chosen with `new --agent=`). Exit it to get this shell; run `pi` (or `opencode`) to start it again. Commands
# (`ssh vm@host cmd`), scp and sftp are not login shells with a terminal: they never start it.
case "$-" in *i*) ;; *) return 0 2>/dev/null || exit 0 ;; esac
if [ -n "${SSH_TTY:-}" ] && [ -t 0 ] && [ -t 1 ] && [ -z "${USSYCODE_AGENT_STARTED:-}" ]; then
    export USSYCODE_AGENT_STARTED=1
    _ussy_agent="${USSYCODE_AGENT:-pi}"
    if [ "$_ussy_agent" != none ] && command -v "$_ussy_agent" >/dev/null 2>&1; then
        echo "starting $_ussy_agent (your AI agent; exit it for a shell, '$_ussy_agent' starts it again)"
        (cd "$HOME" && "$_ussy_agent")
    fi
    unset _ussy_agent
fi
