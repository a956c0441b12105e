"""raypipe: opportunistic fracture-risk models from routine spine imaging, on Ray."""
__version__ = "0.1.0"
