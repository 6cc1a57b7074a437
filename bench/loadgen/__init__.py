"""The load generator: streaming chat requests, closed- or open-loop, with /health probes."""
