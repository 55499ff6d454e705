"""An ensemble trained on one shared input pipeline, each member published under its own name."""
