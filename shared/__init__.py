"""Code shared by the Flower apps, the API and the CLI: data, model, metrics, training."""
