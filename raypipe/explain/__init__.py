"""Explanations of model outputs (Grad-CAM)."""
