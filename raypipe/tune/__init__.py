"""Ray Tune: k-fold cross-validation, Optuna search, result tables."""
