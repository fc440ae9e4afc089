"""Training: the reference target's eyes (`reference_data`, `reference_train`)."""
