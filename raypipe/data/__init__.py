"""Ray Data pipelines (manifest -> shards), patient-level sampling, synthetic cohorts."""
