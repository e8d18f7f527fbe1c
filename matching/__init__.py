"""Trajectory matching: the synthetic set's start, the student steps and the meta-gradient, the learned state
and its update (distiller.py), and a distillation run's resume point, folder, timing record and writer."""
