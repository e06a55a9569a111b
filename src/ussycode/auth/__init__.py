"""Identity, credentials and the pure access policy."""
