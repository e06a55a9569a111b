"""The SSH gateway: the lobby (``ssh -p 2222 host``) and direct VM access (``ssh -p 2222 vm@host``)."""
