"""Trajectory matching: expert cycling, the synthetic set, and the matching loss."""
