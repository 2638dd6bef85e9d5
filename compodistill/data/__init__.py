"""Data: the procedural compositional-reasoning benchmark, LLaVA-format loaders and benchmark readers."""
