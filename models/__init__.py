"""Per-user LSTM demand models (issue 3): stacked per-user weights, training, model store."""
