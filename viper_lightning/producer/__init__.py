"""producer side of Viper (private modules; the public names are re-exported by viper_lightning)."""
