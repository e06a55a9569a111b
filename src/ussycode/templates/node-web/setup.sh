#!/bin/sh
set -eu
mkdir -p "$HOME/app"
cat > "$HOME/app/server.js" <<'JS'
const http = require("http");
http.createServer((req, res) => {
  if (req.url === "/health") { res.writeHead(200, {"Content-Type": "application/json"}); res.end('{"ok": true}'); return; }
  res.writeHead(200, {"Content-Type": "text/html"});
  res.end("<!doctype html><h1>Hello from node-web</h1><p>Edit ~/app/server.js, then run ~/app/restart.</p>");
}).listen(8080, "0.0.0.0");
JS
cat > "$HOME/app/restart" <<'SH'
#!/bin/sh
if [ -f "$HOME/app/server.pid" ]; then  # stop the running app, and let it go before the new one starts
  old=$(cat "$HOME/app/server.pid"); kill "$old" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
fi
cd "$HOME/app" || exit 1
setsid nohup node server.js > "$HOME/app/server.log" 2>&1 < /dev/null &
echo $! > "$HOME/app/server.pid"
i=0; until curl -s -o /dev/null --max-time 2 http://127.0.0.1:8080/; do  # "serving" means it answers
  i=$((i + 1)); [ "$i" -lt 300 ] || { echo "nothing answers on port 8080 after 30 s: see ~/app/server.log" >&2; exit 1; }; sleep 0.1
done
SH
chmod +x "$HOME/app/restart"
"$HOME/app/restart"
echo "node-web is serving ~/app/server.js on port 8080"
