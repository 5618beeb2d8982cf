"""Policies as code: the model, YAML loading with file:line errors, and hot reload."""
