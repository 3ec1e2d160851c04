"""The operator's console: pages and a JSON API over dead letters, runs and sources."""

from sluice.ops.console.app import create_app

__all__ = ["create_app"]
