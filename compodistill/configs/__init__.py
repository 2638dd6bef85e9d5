"""The packaged stage configs: one YAML per stage (`--config dft` finds dft.yaml here)."""
