"""Training through the importance-aware sample cache (SHADE), configured from LightningCLI YAML."""
