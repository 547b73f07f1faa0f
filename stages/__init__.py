"""Thin DVC stage entry points: read params, call `matrice`, write outputs atomically."""
