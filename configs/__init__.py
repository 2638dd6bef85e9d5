"""Stage configs, installed as the package data `compodistill.configs` (`--config dft` finds dft.yaml)."""
