"""A world of coloured shapes and the small models trained on it (see world.py and train.py)."""
