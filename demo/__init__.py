"""The embedded demo model, a diffusers SD 1.x folder shipped as package data (see training/README.md).

This file only makes the folder the package `sdrt.demo`, so a wheel install carries the model and
`sdrt export --checkpoint demo` finds it from any folder. Nothing here is meant to be imported.
"""
