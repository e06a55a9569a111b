"""Domain services: the only code that changes state. Frontends reach them through commands."""
