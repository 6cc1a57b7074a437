"""Turning load runs into Markdown tables, JSON files and a /health plot."""
