"""Images for vlserve: sources, decode and preprocessing, batched vision encoding, prompt preparation."""
