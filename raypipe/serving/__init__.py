"""Ray Serve deployments, the scoring graph and upload safety."""
