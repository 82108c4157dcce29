"""Training side: synthetic data, datasets, backbones, training, evaluation, model bundles."""
