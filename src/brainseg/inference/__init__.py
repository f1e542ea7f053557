"""Running a model: backends, the one predictor, the registry, export, slices / volumes / batches in and masks out."""
