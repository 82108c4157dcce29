"""Running it: supervisor (cxr up), Flower, the review page, the bench."""
