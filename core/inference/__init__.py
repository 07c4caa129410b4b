"""Running a network on batches of tiles: the Predictor protocol and its two backends."""
