"""Experiments that train and compare models (the ablation); ``server.report`` renders their results."""
