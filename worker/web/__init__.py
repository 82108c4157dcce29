"""The review app (`cxr web`): a live worklist where a clinician sees, confirms or corrects
each result; its labels go to the ``labels`` table (``db.labels``)."""
