"""Ray Train loops (one per task) and the shared trainer plumbing."""
