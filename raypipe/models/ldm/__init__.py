"""Diff-X latent diffusion models (papers/004): VAE, UNets, prompt encoder, plug-and-play feature injection.

nn/diffusers modules only (no I/O, no Ray); the sampling loop lives in `raypipe.generate`.
"""
