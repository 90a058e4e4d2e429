"""Policy files: YAML loading with source positions, the typed model and validation."""
