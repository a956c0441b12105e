"""Ray-free predictors (load a registry model, preprocess, predict) shared by batch jobs and Serve."""
