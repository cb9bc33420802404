"""Hardware profiles shipped with edgewire, one YAML file per kind of device."""
