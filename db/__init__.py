"""The ground floor: schema, sessions, migrations, the registry and every query, plus the
vocabulary (stages, labels, statuses) and the errors every floor shares."""
