"""The middle floor: the model bundle contract, the pixels a model sees (one decoder for
training and serving), data sets, backbones, training, evaluation, publishing, synthetic data."""
