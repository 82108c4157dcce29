"""The way in: watcher, filters, stability, intake (inbox -> archive -> row -> queue)."""
