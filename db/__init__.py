"""Database layer: models, sessions, migrations and every query the app runs."""
