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
[ -f "$HOME/app/server.pid" ] && kill "$(cat "$HOME/app/server.pid")" 2>/dev/null || true
cd "$HOME/app" || exit 1
setsid nohup node server.js > "$HOME/app/server.log" 2>&1 < /dev/null &
echo $! > "$HOME/app/server.pid"
SH
chmod +x "$HOME/app/restart"
"$HOME/app/restart"
echo "node-web is serving ~/app/server.js on port 8080"
