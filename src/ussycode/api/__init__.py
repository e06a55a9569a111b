"""The HTTP app server behind Caddy: the API, browser login, forward-auth for private VMs."""
