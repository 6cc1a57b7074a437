"""The model side of vlserve: loading, continuous batching, sampling, detokenization."""
