"""Data: the embedded shapes dataset, samplers and text encoders."""
