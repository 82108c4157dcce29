"""Data sets, backbones, training, evaluation, model card, publishing and import."""
