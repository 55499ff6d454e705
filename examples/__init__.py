"""Runnable example workloads for viper_lightning (models and data modules)."""
