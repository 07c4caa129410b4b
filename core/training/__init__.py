"""Training, evaluating and quantizing models on a person's own labelled imagery."""
