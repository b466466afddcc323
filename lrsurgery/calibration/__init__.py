"""The `calibrate` stage: block-by-block covariances and sensitivities, the stats file, its summaries."""
