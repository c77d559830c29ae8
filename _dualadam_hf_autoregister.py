"""Placeholder: replaced by the startup hook (issue 3)."""
