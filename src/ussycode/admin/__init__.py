"""The operator's frontend: the admin panel (``panel``) and its CSV exports (``exports``)."""
