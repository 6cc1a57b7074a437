"""Reusable test fixtures that are real programs (servers, clients), not pytest fixtures."""
