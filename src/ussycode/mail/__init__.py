"""Mail frontends: the inbound SMTP server."""
