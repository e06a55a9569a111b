"""Storage: SQLAlchemy Core over SQLite (WAL, the default) or PostgreSQL. One query module per aggregate."""
