"""Shared helpers: data readers, the toy world, evaluation, configuration."""
