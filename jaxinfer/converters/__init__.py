"""Format converters: each reads its files into the neutral Graph and keeps its own op registry."""
