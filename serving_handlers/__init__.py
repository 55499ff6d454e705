"""TorchServe handlers that serve Viper-published weights (see the TorchServe integration issue)."""
