"""Deployments of the tracking flows (``serve`` runs them all from one local process)."""
