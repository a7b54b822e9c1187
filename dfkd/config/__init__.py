"""Typed configs, validated before any work starts: the stages' settings and the recipe. No torch here.

`overrides` is the one way `--set key=value` strings and recipe values reach a config; each stage
has its config module (`synthesis`, `distill`, `teacher`), and `recipe` validates a TOML file into them.
"""
