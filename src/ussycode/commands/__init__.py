"""The one command registry that the SSH lobby, ``POST /exec`` and the admin panel all call."""
