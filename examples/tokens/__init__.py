"""Serving a model that takes int64 token ids: a TorchServe handler whose only change is preprocess."""
