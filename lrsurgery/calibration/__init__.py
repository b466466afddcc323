"""The `calibrate` stage: block-by-block activation covariances and sensitivities; summaries of stats artifacts."""
