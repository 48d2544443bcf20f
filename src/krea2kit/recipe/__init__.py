"""The recipe language: a versioned TOML schema, loading (extends, overrides, stdin) and
planning into jobs. Torch-free."""

SCHEMA_ID = "krea2kit.recipe/1"
