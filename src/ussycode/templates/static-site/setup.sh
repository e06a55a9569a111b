#!/bin/sh
set -eu
mkdir -p "$HOME/site"
[ -e "$HOME/site/index.html" ] || cat > "$HOME/site/index.html" <<'HTML'
<!doctype html><html><head><meta charset="utf-8"><title>static-site</title></head>
<body><h1>Hello from static-site</h1><p>Put your files in ~/site.</p></body></html>
HTML
cd "$HOME/site" && setsid nohup python3 -m http.server 8080 --bind 0.0.0.0 > "$HOME/.ussycode/site.log" 2>&1 < /dev/null &
i=0; until curl -s -o /dev/null --max-time 2 http://127.0.0.1:8080/; do  # "serving" means it answers
  i=$((i + 1)); [ "$i" -lt 300 ] || { echo "nothing answers on port 8080 after 30 s: see ~/.ussycode/site.log" >&2; exit 1; }; sleep 0.1
done
echo "static-site is serving ~/site on port 8080"
