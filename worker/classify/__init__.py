"""The Celery side: app, broker, task, the batch steps, claims, inference, heatmaps, recovery."""
