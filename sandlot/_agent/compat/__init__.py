"""Stand-ins for modules that notebook code imports, put at the end of a session's sys.path (a real one,
installed in the template, wins). Stdlib only."""
