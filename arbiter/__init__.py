"""Arbiter's control plane and CLI (`arbiter`)."""
