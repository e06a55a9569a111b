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
if [ -f "$HOME/app/server.pid" ]; then  # stop the running app, and let it go before the new one starts
  old=$(cat "$HOME/app/server.pid"); kill "$old" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
fi
cd "$HOME/app" || exit 1
setsid nohup python3 -m uvicorn app:app --host 0.0.0.0 --port 8080 > "$HOME/app/server.log" 2>&1 < /dev/null &
echo $! > "$HOME/app/server.pid"
i=0; until curl -s -o /dev/null --max-time 2 http://127.0.0.1:8080/; do  # "serving" means it answers
  i=$((i + 1)); [ "$i" -lt 300 ] || { echo "nothing answers on port 8080 after 30 s: see ~/app/server.log" >&2; exit 1; }; sleep 0.1
done
SH
chmod +x "$HOME/app/restart"
"$HOME/app/restart"
echo "python-web is serving ~/app/app.py on port 8080"
