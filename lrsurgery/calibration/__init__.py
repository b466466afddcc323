"""The `calibrate` stage: block-by-block activation covariances and sensitivities, the stats file (reading and
merging), summaries of stats artifacts."""
