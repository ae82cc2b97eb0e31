"""Cluster operations: Ray start-up, actor pools, the local head, job submission, local services."""
