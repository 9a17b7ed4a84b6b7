"""Server side: the Flower ServerApp, the `fedmri` CLI, the inference API and the fairness report."""
