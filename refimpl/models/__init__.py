"""Whole-model assemblies, one module per architecture family."""
