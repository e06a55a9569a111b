#!/bin/sh
# Runs once, as the VM's user, after the first boot. Its output is ~/.ussycode/setup.log.
set -eu
mkdir -p "$HOME/app"
cat > "$HOME/app/app.py" <<'PY'
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route


async def home(request):
    return HTMLResponse("<!doctype html><h1>Hello from python-web</h1><p>Edit ~/app/app.py, then run "
                        "<code>~/app/restart</code>.</p>")


async def health(request):
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/", home), Route("/health", health)])
PY
cat > "$HOME/app/restart" <<'SH'
#!/bin/sh
[ -f "$HOME/app/server.pid" ] && kill "$(cat "$HOME/app/server.pid")" 2>/dev/null || true
cd "$HOME/app" || exit 1
setsid nohup python3 -m uvicorn app:app --host 0.0.0.0 --port 8080 > "$HOME/app/server.log" 2>&1 < /dev/null &
echo $! > "$HOME/app/server.pid"
SH
chmod +x "$HOME/app/restart"
"$HOME/app/restart"
echo "python-web is serving ~/app/app.py on port 8080"
