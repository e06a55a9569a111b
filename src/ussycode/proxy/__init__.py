"""HTTPS entry for VM URLs: pure Route -> Caddy JSON builders, the Caddy admin client, the managed Caddy
process, and the unix-socket port bridges that carry Caddy's traffic into a VM through the runtime."""
