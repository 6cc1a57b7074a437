"""What the benchmark sends: synthetic chat prompts and unique natural-looking images."""
