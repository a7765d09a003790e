"""Kept so deployments made before the flows moved to ``tracking.flows`` keep running (their
entrypoint is ``tracking.runner.resume_flow``). New code imports ``tracking.flows``."""

from tracking.flows import deployment_name, intake_flow, resume_flow

__all__ = ["deployment_name", "intake_flow", "resume_flow"]
