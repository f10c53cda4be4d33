"""The console scripts. Each module parses flags, validates its inputs, calls the library and turns the
project's own errors into one line on stderr (see `common.run`). Nothing else lives here."""
