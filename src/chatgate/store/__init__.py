"""Persistence: the database engine, the schema, its migrations and the repositories."""
