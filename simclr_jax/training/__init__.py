"""The host training loop and the jitted steps it drives."""
