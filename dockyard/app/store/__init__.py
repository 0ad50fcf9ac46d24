"""The SQLite store: every query dockyard runs lives in this package, one module per resource."""
